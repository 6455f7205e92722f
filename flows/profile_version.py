"""The ``profile-new-version`` flow: a new model version is profiled when it is created.

The registry announces the version (the ``model_version.created`` webhook, or the poller), and
this flow profiles it exactly as a deploy of it would (the model's serve settings, the
inventory's device class) and caches the profile on the version's tags. A later promotion of
the version finds the profile there instead of measuring it on the way to serving.
"""

from __future__ import annotations

from prefect import flow

from nodewise.core.settings import current_settings
from tasks.planning.serve_config import serve_settings_for
from tasks.steps import profile_model_task, read_inventory_task, resolve_model_task


@flow(name="profile-new-version", log_prints=True, validate_parameters=True)
def profile_new_version(model_name: str, version: str, inventory: str = "local") -> str:
    """Profile ``model_name`` version ``version`` for ``inventory`` and cache it on its tags.

    Args:
        model_name: the registered model's name.
        version: the version just created.
        inventory: where it would run (the device class decides how it is profiled), as a deploy's.
    """
    settings = current_settings()
    model = resolve_model_task(f"models:/{model_name}/{version}", settings.tracking_uri, settings.registry_uri)
    serve = serve_settings_for(model, settings.serve)
    ray = settings.ray
    nodes = read_inventory_task(inventory, ray.num_cpus, ray.max_added_nodes, ray.added_node_cpus)
    profile = profile_model_task(model, batch_size=serve.max_batch_size, device=nodes.device_class)
    summary = f"{model.pinned_uri}: {profile.total_bytes / 2**20:.1f} MiB a copy, cached on the version's tags"
    print(summary)
    return summary
