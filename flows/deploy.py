"""The ``deploy_model`` flow: registry -> profile -> placement -> Ray Serve -> smoke test -> record."""

from __future__ import annotations

from prefect import flow

from nodewise.errors import DeployFailed, DoesNotFit, UnsupportedModel
from nodewise.settings import Settings, load_settings
from tasks.inventory import read_inventory_task
from tasks.placement import plan_placement_task
from tasks.profile_models import profile_model_task
from tasks.ray_cluster import ensure_cluster_task
from tasks.ray_serve import build_spec, deploy_app_task, rollback_task
from tasks.records import DeploymentRecord, get_record, record_deployment_task
from tasks.registry import resolve_model_task
from tasks.report import publish_report_task
from tasks.serve_config import serve_settings_for
from tasks.smoke import smoke_test_task


@flow(name="deploy-model", log_prints=True, validate_parameters=True)
def deploy_model(
    model_uri: str, replicas: int | None = None, inventory: str = "local", settings: Settings | None = None
) -> DeploymentRecord:
    """Deploy a registered MLflow model where it fits, check it, and record it.

    Args:
        model_uri: ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``.
        replicas: replicas wanted (default: ``serve.replicas``); the plan may give fewer.
        inventory: where it may run: ``local``, ``nvml``, ``ray[:ADDRESS]``, ``k8s`` or a YAML file.
        settings: nodewise settings (default: read from the environment).
    """
    settings = settings or load_settings()
    model = resolve_model_task(model_uri, settings.tracking_uri, settings.registry_uri)
    serve = serve_settings_for(model, settings.serve)  # the model's nodewise.serve.* tags applied
    nodes = read_inventory_task(inventory, settings.ray.num_cpus)
    profile = profile_model_task(model, batch_size=serve.max_batch_size, device=nodes.device_class)
    plan = plan_placement_task(
        profile, nodes, settings.placement.headroom_fraction, replicas or serve.min_replicas or serve.replicas
    )
    publish_report_task(model.pinned_uri, profile, plan)
    if not plan.fits:
        raise DoesNotFit(f"{model.pinned_uri} was not deployed: {plan.explain()}")
    if plan.backend != "ray_serve":
        raise UnsupportedModel(
            f"{model.pinned_uri} needs {plan.nodes} nodes ({plan.explain()}); the multi-node "
            "DeepSpeed backend is not available in this version of nodewise"
        )
    cluster = ensure_cluster_task(settings)
    spec = build_spec(model, plan, settings, serve)
    previous = get_record(settings.records_path, spec.app_name)
    remote = not cluster.owned
    try:
        endpoint = deploy_app_task(spec, settings, remote)
        smoke = smoke_test_task(endpoint, model, settings.smoke)
    except DeployFailed as e:
        outcome = rollback_task(spec, previous.spec if previous else None, settings, remote)
        raise DeployFailed(f"{e} (rolled back: {outcome})") from e
    print(
        f"{model.pinned_uri} serves at {endpoint}: smoke test {'matched the model' if smoke.compared else 'answered'}"
    )
    return record_deployment_task(
        settings.records_path,
        DeploymentRecord(
            app_name=spec.app_name,
            model_name=model.name,
            model_version=model.version,
            model_uri=model.pinned_uri,
            backend="ray_serve",
            endpoint=endpoint,
            replicas=plan.replicas,
            plan=plan.explain(),
            spec=spec.model_dump(mode="json"),
        ),
    )
