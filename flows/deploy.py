"""The ``deploy_model`` flow: registry -> profile -> placement -> Ray Serve or DeepSpeed/MPI -> smoke test -> record."""

from __future__ import annotations

from typing import Any

from prefect import flow

from nodewise.core.errors import DeployFailed, DoesNotFit
from nodewise.core.settings import ServeSettings, Settings, current_settings
from serving.spec import DeepSpeedSpec, ModelServeSpec
from tasks.mpi.deploy import build_deepspeed_spec
from tasks.planning.placement import PlacementPlan
from tasks.planning.plan import requested
from tasks.planning.registry import ResolvedModel
from tasks.planning.serve_config import serve_settings_for
from tasks.rayserve.apps import build_spec
from tasks.records import DeploymentRecord, deploy_lock, get_record
from tasks.steps import (
    deploy_app_task,
    deploy_cluster_task,
    ensure_cluster_task,
    plan_placement_task,
    profile_model_task,
    publish_report_task,
    publish_targets_task,
    read_inventory_task,
    record_deployment_task,
    resolve_model_task,
    rollback_task,
    smoke_test_task,
)


@flow(name="deploy-model", log_prints=True, validate_parameters=True)
def deploy_model(model_uri: str, replicas: int | None = None, inventory: str = "local") -> DeploymentRecord:
    """Deploy a registered MLflow model where it fits, check it, and record it.

    The settings come from the environment, or from a caller's ``using_settings`` block: never a
    parameter (Prefect stores and shows every parameter of every run).

    Args:
        model_uri: ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``.
        replicas: a fixed number of replicas (default: the model's ``replicas``, else autoscaling from
            its ``min_replicas`` up to ``max_replicas``); the plan may give fewer.
        inventory: where it may run: ``local``, ``nvml``, ``ray[:ADDRESS]``, ``k8s`` or a YAML file.
    """
    settings = current_settings()
    model = resolve_model_task(model_uri, settings.tracking_uri, settings.registry_uri)
    with deploy_lock(settings.state, model.name):  # two deploys of one model: the second waits its turn
        return _deploy(model, replicas, inventory, settings)


def _deploy(model: ResolvedModel, replicas: int | None, inventory: str, settings: Settings) -> DeploymentRecord:
    """Profile, plan, deploy, smoke-test and record ``model`` (under its deploy lock)."""
    serve = requested(serve_settings_for(model, settings.serve), replicas)  # its nodewise.serve.* tags applied
    ray = settings.ray
    nodes = read_inventory_task(inventory, ray.num_cpus, ray.max_added_nodes, ray.added_node_cpus)
    profile = profile_model_task(model, batch_size=serve.max_batch_size, device=nodes.device_class)
    plan = plan_placement_task(profile, nodes, settings, serve, replicas)  # tasks/planning/plan.py's rules
    if not plan.fits:
        publish_report_task(model.pinned_uri, profile, plan)
        raise DoesNotFit(f"{model.pinned_uri} was not deployed: {plan.explain()}")
    try:
        if plan.backend == "deepspeed_mpi":
            return _deploy_deepspeed(model, plan, settings)
        return _deploy_serve(model, plan, settings, serve)
    finally:  # after the deploy, not on its way (its chart takes half a second): failed or not
        publish_report_task(model.pinned_uri, profile, plan)


def _deploy_serve(
    model: ResolvedModel, plan: PlacementPlan, settings: Settings, serve: ServeSettings
) -> DeploymentRecord:
    """One node: Ray Serve replicas, smoke-tested, rolled back on failure."""
    cluster = ensure_cluster_task(settings)
    spec = build_spec(model, plan, settings, serve)
    previous = get_record(settings.state.records, spec.app_name)
    on_deepspeed = previous is not None and previous.backend == "deepspeed_mpi"
    remote = not cluster.owned
    try:
        endpoint = deploy_app_task(spec, settings, remote)
        smoke = smoke_test_task(endpoint, model, settings.smoke)
    except DeployFailed as e:
        outcome = rollback_task(spec, previous.spec if previous and not on_deepspeed else None, settings, remote)
        if on_deepspeed:
            outcome += f"; version {previous.model_version} keeps serving on DeepSpeed"
        raise DeployFailed(f"{e} (rolled back: {outcome})") from e
    if on_deepspeed:  # the model moved to one node: its multi-node job goes once the replicas answer
        from tasks.mpi.front import stop_front
        from tasks.mpi.launcher import stop_cluster

        stop_cluster(settings, spec.app_name)
        stop_front(settings, spec.app_name)
    print(
        f"{model.pinned_uri} serves at {endpoint}: smoke test {'matched the model' if smoke.compared else 'answered'}"
    )
    return _record(settings, model, plan, spec, endpoint, "ray_serve", plan.replicas, smoke.request)


def _deploy_deepspeed(model: ResolvedModel, plan: PlacementPlan, settings: Settings) -> DeploymentRecord:
    """Several nodes: DeepSpeed tensor parallelism over MPI ranks, every rank in every request."""
    spec = build_deepspeed_spec(model, plan, settings)
    endpoint, smoke, upgrade = deploy_cluster_task(spec, plan, model, settings)  # rolls back itself on failure
    previous = get_record(settings.state.records, spec.app_name)
    if previous is not None and previous.backend == "ray_serve":  # moved off one node: retire its replicas
        _delete_serve_app(settings, spec.app_name)
    print(
        f"{model.pinned_uri} serves at {endpoint} on {plan.ranks} DeepSpeed ranks: smoke test "
        f"{'matched the whole model' if smoke.compared else 'answered'}"
        + ("" if upgrade.mode == "first" else f"; {upgrade.line()}")
    )
    return _record(settings, model, plan, spec, endpoint, "deepspeed_mpi", 1, smoke.request)


def _record(
    settings: Settings,
    model: ResolvedModel,
    plan: PlacementPlan,
    spec: ModelServeSpec | DeepSpeedSpec,
    endpoint: str,
    backend: str,
    replicas: int,
    canary: dict[str, Any],
) -> DeploymentRecord:
    record = record_deployment_task(
        settings.state.records,
        DeploymentRecord(
            app_name=spec.app_name,
            model_name=model.name,
            model_version=model.version,
            model_uri=model.pinned_uri,
            backend=backend,
            endpoint=endpoint,
            replicas=replicas,
            plan=plan.explain(),
            spec=spec.model_dump(mode="json"),
            canary=canary,
        ),
    )
    publish_targets_task(settings, record)
    return record


def _delete_serve_app(settings: Settings, app_name: str) -> None:
    from tasks.rayserve.apps import delete_app
    from tasks.rayserve.cluster import connect, current_cluster

    cluster = current_cluster(settings)
    if cluster is not None:
        connect(cluster)
        delete_app(app_name)
