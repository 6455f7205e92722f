"""One planning path: resolve -> the model's serve settings -> inventory -> profile -> placement.

``plan_model`` is what ``nodewise profile`` and ``nodewise render`` run; the ``deploy_model`` flow
runs the same steps as Prefect tasks (tasks/steps.py) and decides with the same rules:
``desired_replicas`` and ``place``. A rule lives here once, so the CLI, the renderer and the flow
never plan differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nodewise.core.errors import InvalidModelConfig
from nodewise.core.settings import ServeSettings, Settings
from tasks.planning.inventory import Inventory
from tasks.planning.placement import PlacementPlan, plan_placement
from tasks.planning.profiling import MemoryProfile
from tasks.planning.registry import ResolvedModel


def desired_replicas(serve: ServeSettings, replicas: int | None = None) -> int:
    """Replicas to start: an explicit request, else a fixed ``serve.replicas``, else the autoscaling
    floor; at least one (a model that scales to zero still starts one replica, to prove it loads)."""
    return replicas or serve.replicas or max(1, serve.min_replicas)


def requested(serve: ServeSettings, replicas: int | None) -> ServeSettings:
    """``serve`` with an explicit request for ``replicas`` (``deploy --replicas``): a fixed count."""
    return serve if replicas is None else serve.model_copy(update={"replicas": replicas})


def place(
    profile: MemoryProfile, nodes: Inventory, settings: Settings, serve: ServeSettings, replicas: int | None = None
) -> PlacementPlan:
    """The placement of ``profile`` on ``nodes`` with the configured headroom and the replicas wanted."""
    return plan_placement(
        profile,
        nodes,
        headroom_fraction=settings.placement.headroom_fraction,
        desired_replicas=desired_replicas(serve, replicas),
    )


@dataclass(frozen=True)
class ModelPlan:
    """What planning found: the model (None for a bare config), its settings, nodes, profile and plan."""

    name: str
    model: ResolvedModel | None
    serve: ServeSettings
    nodes: Inventory
    profile: MemoryProfile
    plan: PlacementPlan


def plan_model(
    model: str,
    inventory: str,
    settings: Settings,
    *,
    replicas: int | None = None,
    batch_size: int | None = None,
    dtype: str | None = None,
    seq_len: int | None = None,
    measure: bool = True,
    cached: bool = True,
) -> ModelPlan:
    """Plan ``model`` (``models:/...`` or a transformers config.json) on ``inventory``.

    Args:
        model: a registered model's URI, or the path of a config JSON (analytic profile only).
        inventory: ``local``, ``nvml``, ``ray[:ADDRESS]``, ``k8s`` or a YAML file of nodes.
        settings: nodewise settings; a registered model's ``nodewise.serve.*`` tags apply on top.
        replicas: a fixed number of replicas (default: the model's ``replicas``, else autoscaling
            from its ``min_replicas``).
        batch_size: rows per forward pass to profile (default: the model's ``max_batch_size``).
        dtype: weights dtype override (fp32, bf16, fp16, int8, int4).
        seq_len: tokens per sequence (config JSONs of causal LMs).
        measure: also measure a registered model in a subprocess.
        cached: reuse (and store) the profile cached on the version's tags, as a deploy does.
    """
    from tasks.planning.inventory_sources import read_inventory
    from tasks.planning.profiling import dtype_bytes

    if dtype is not None:
        dtype_bytes(dtype)  # fail fast on an unknown dtype, before any work
    ray = settings.ray
    nodes = read_inventory(inventory, ray.num_cpus, ray.max_added_nodes, ray.added_node_cpus).require_nodes()
    if model.startswith("models:/"):
        return _plan_registered(model, nodes, settings, replicas, batch_size, dtype, measure, cached)
    if not (model.endswith(".json") or Path(model).is_dir()):
        raise InvalidModelConfig(
            f"{model!r} is neither a models:/ URI nor a config JSON; use models:/NAME@ALIAS, "
            "models:/NAME/VERSION, or a path to a transformers config.json"
        )
    from tasks.planning.profiling import load_config, profile_config

    serve = requested(settings.serve, replicas)
    profile = profile_config(
        load_config(model), dtype=dtype, batch_size=batch_size or 1, seq_len=seq_len, device=nodes.device_class
    )
    return ModelPlan(model, None, serve, nodes, profile, place(profile, nodes, settings, serve, replicas))


def _plan_registered(
    uri: str,
    nodes: Inventory,
    settings: Settings,
    replicas: int | None,
    batch_size: int | None,
    dtype: str | None,
    measure: bool,
    cached: bool,
) -> ModelPlan:
    from tasks.planning.profile_models import cuda_here, profile_registered, profile_with_cache
    from tasks.planning.registry import make_client, resolve_model
    from tasks.planning.serve_config import serve_settings_for

    model = resolve_model(uri, make_client(settings.tracking_uri, settings.registry_uri))
    serve = requested(serve_settings_for(model, settings.serve), replicas)
    rows = batch_size or serve.max_batch_size
    if cached and measure:
        profile = profile_with_cache(model, batch_size=rows, device=nodes.device_class, dtype=dtype)
    else:
        device = nodes.device_class if nodes.device_class == "cpu" or cuda_here() else "cpu"
        profile = profile_registered(model, dtype=dtype, batch_size=rows, measured=measure, device=device)
    plan = place(profile, nodes, settings, serve, replicas)
    return ModelPlan(model.pinned_uri, model, serve, nodes, profile, plan)
