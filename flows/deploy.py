"""The ``deploy_model`` flow: registry -> profile -> placement -> the plan's backend (deploy, smoke test) -> record."""

from __future__ import annotations

from prefect import flow

from nodewise.core.errors import DoesNotFit
from nodewise.core.settings import ServeSettings, Settings, current_settings
from tasks.backend import Deployed
from tasks.backends import backend_for
from tasks.planning.placement import PlacementPlan
from tasks.planning.plan import requested
from tasks.planning.registry import ResolvedModel
from tasks.planning.serve_config import serve_settings_for
from tasks.records import DeploymentRecord, app_name_for, deploy_lock, get_record
from tasks.steps import (
    deploy_task,
    plan_placement_task,
    profile_model_task,
    publish_report_task,
    publish_targets_task,
    read_inventory_task,
    record_deployment_task,
    resolve_model_task,
    retire_task,
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
        return _deploy_on_backend(model, plan, settings, serve)
    finally:  # after the deploy, not on its way (its chart takes half a second): failed or not
        publish_report_task(model.pinned_uri, profile, plan)


def _deploy_on_backend(
    model: ResolvedModel, plan: PlacementPlan, settings: Settings, serve: ServeSettings
) -> DeploymentRecord:
    """The plan's backend starts it and checks it (rolling back itself on failure); a backend the
    model moved off retires its processes once the new ones answer."""
    assert plan.backend is not None  # a plan that fits names its backend
    previous = get_record(settings.state.records, app_name_for(model.name))
    deployed = deploy_task(plan.backend, model, plan, settings, serve, previous)
    if previous is not None and backend_for(previous.backend) is not backend_for(plan.backend):
        retire_task(previous.backend, settings, previous.app_name)  # moved (one node <-> several)
    print(deployed.summary)
    return _record(settings, model, plan, plan.backend, deployed)


def _record(
    settings: Settings, model: ResolvedModel, plan: PlacementPlan, backend: str, deployed: Deployed
) -> DeploymentRecord:
    record = record_deployment_task(
        settings.state.records,
        DeploymentRecord(
            app_name=app_name_for(model.name),
            model_name=model.name,
            model_version=model.version,
            model_uri=model.pinned_uri,
            backend=backend,
            endpoint=deployed.endpoint,
            replicas=deployed.replicas,
            plan=plan.explain(),
            spec=deployed.spec,
            canary=deployed.canary,
            replaced=deployed.replaced,
        ),
    )
    publish_targets_task(settings, record)
    return record
