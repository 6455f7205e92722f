"""The Prefect tasks the flows compose: each a thin ``@task`` over a plain function of its concern.

This is the one module of ``tasks/`` that imports Prefect (an import-linter contract keeps it so):
the plain functions stay testable without it, and commands that run no flow (``nodewise
profile``, ``render``, ``status``) never pay for importing it. Retries and timeouts live on the
decorators.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from nodewise.core.settings import ServeSettings, Settings, SmokeSettings
from serving.spec import DeepSpeedSpec, ModelServeSpec
from tasks.metrics.targets import publish_targets
from tasks.mpi.deploy import deploy_cluster, smoke_test_lm
from tasks.mpi.upgrade import Upgrade
from tasks.planning.inventory import Inventory
from tasks.planning.inventory_sources import read_inventory
from tasks.planning.placement import PlacementPlan
from tasks.planning.plan import place
from tasks.planning.profile_models import profile_with_cache
from tasks.planning.profiling import MemoryProfile
from tasks.planning.registry import ResolvedModel, make_client, resolve_model, retry_unreachable
from tasks.planning.report import bar_chart_png, breakdown_rows
from tasks.rayserve.apps import deploy_app, rollback
from tasks.rayserve.cluster import RayCluster, connect, ensure_cluster
from tasks.records import DeploymentRecord, save_record
from tasks.smoke import SmokeResult, smoke_test
from tasks.watchdog.engine import Action, watch_once


# -- planning ------------------------------------------------------------------------------------
@task(
    name="resolve-model",
    retries=2,
    retry_delay_seconds=[1, 3],
    retry_condition_fn=retry_unreachable,
    cache_policy=NO_CACHE,
)
def resolve_model_task(uri: str, tracking_uri: str, registry_uri: str) -> ResolvedModel:
    """Resolve ``uri`` to one pinned registered version (retried only if unreachable)."""
    return resolve_model(uri, make_client(tracking_uri, registry_uri))


@task(name="read-inventory", cache_policy=NO_CACHE)
def read_inventory_task(
    source: str = "local", num_cpus: int | None = None, added_nodes: int = 0, added_node_cpus: int = 1
) -> Inventory:
    """The inventory from ``source``: local, nvml, ray[:ADDRESS], k8s, or a YAML file."""
    return read_inventory(source, num_cpus, added_nodes, added_node_cpus).require_nodes()


@task(name="profile-model", cache_policy=NO_CACHE, timeout_seconds=900)
def profile_model_task(
    model: ResolvedModel, batch_size: int = 1, device: str = "cpu", dtype: str | None = None
) -> MemoryProfile:
    """Profile ``model`` (analytic + measured), reusing the profile cached on its version tags."""
    return profile_with_cache(model, batch_size=batch_size, device=device, dtype=dtype)


@task(name="plan-placement", cache_policy=NO_CACHE)
def plan_placement_task(
    profile: MemoryProfile, inventory: Inventory, settings: Settings, serve: ServeSettings, replicas: int | None
) -> PlacementPlan:
    """Choose where the model runs (the same rule ``nodewise profile`` and ``render`` use)."""
    return place(profile, inventory, settings, serve, replicas)


@task(name="publish-placement-report", cache_policy=NO_CACHE)
def publish_report_task(model_uri: str, profile: MemoryProfile, plan: PlacementPlan) -> None:
    """Attach the breakdown table and chart to the flow run."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    key = re.sub(r"[^a-z0-9-]+", "-", f"placement-{model_uri}".lower()).strip("-")
    rows = breakdown_rows(profile, plan)
    create_table_artifact(rows, key=key, description=f"{model_uri}: {plan.explain()}")
    png = base64.b64encode(bar_chart_png(rows, f"{model_uri} ({profile.method})")).decode()
    create_markdown_artifact(
        f"### {model_uri}\n\n{plan.explain()}\n\n![memory](data:image/png;base64,{png})", key=f"{key}-chart"
    )


# -- Ray Serve -----------------------------------------------------------------------------------
@task(name="ensure-ray-cluster", cache_policy=NO_CACHE, timeout_seconds=180)
def ensure_cluster_task(settings: Settings) -> RayCluster:
    """Reach the configured Ray cluster, or start the local one; connect this process."""
    cluster = ensure_cluster(settings)
    connect(cluster)
    return cluster


@task(name="deploy-to-ray-serve", cache_policy=NO_CACHE)
def deploy_app_task(spec: ModelServeSpec, settings: Settings, remote_cluster: bool) -> str:
    """Deploy or update the model's Serve app; return its endpoint URL."""
    return deploy_app(spec, settings, remote_cluster)


@task(name="roll-back", cache_policy=NO_CACHE)
def rollback_task(
    spec: ModelServeSpec, previous: dict[str, Any] | None, settings: Settings, remote_cluster: bool
) -> str:
    """Put back what served before a failed deploy: the previous spec, or nothing."""
    return rollback(spec, previous, settings, remote_cluster)


@task(name="smoke-test", cache_policy=NO_CACHE)
def smoke_test_task(endpoint: str, model: ResolvedModel, settings: SmokeSettings) -> SmokeResult:
    """Check the deployed endpoint against the model's own output."""
    return smoke_test(endpoint, model, settings)


# -- DeepSpeed over MPI --------------------------------------------------------------------------
@task(name="deploy-to-deepspeed", cache_policy=NO_CACHE)
def deploy_cluster_task(
    spec: DeepSpeedSpec, plan: PlacementPlan, model: ResolvedModel, settings: Settings
) -> tuple[str, SmokeResult, Upgrade]:
    """Launch the model's DeepSpeed job under mpirun (beside the running one when there is room, else in
    its place) and smoke-test it; roll back on failure."""
    return deploy_cluster(spec, plan, settings, lambda endpoint: smoke_test_lm(endpoint, model, spec, settings.smoke))


# -- records -------------------------------------------------------------------------------------
@task(name="record-deployment", cache_policy=NO_CACHE)
def record_deployment_task(path: Path, record: DeploymentRecord) -> DeploymentRecord:
    """Record what is now deployed."""
    return save_record(path, record)


@task(name="publish-scrape-targets", cache_policy=NO_CACHE)
def publish_targets_task(settings: Settings, record: DeploymentRecord) -> None:
    """The deployment's Prometheus scrape targets (tasks/metrics/targets.py)."""
    publish_targets(settings, record)


# -- watchdog ------------------------------------------------------------------------------------
def emit_action(action: Action) -> None:
    """A Prefect event per action (``nodewise.cluster.restarted``, ...), for automations to act on."""
    from prefect.events import emit_event

    emit_event(
        event=action.event,
        resource={"prefect.resource.id": f"nodewise.deployment.{action.app}", "prefect.resource.name": action.app},
        payload=action.model_dump(),
    )


@task(name="watch-once", cache_policy=NO_CACHE)
def watch_once_task(settings: Settings) -> list[Action]:
    """Check every deployment; restart what is sick within its budget; each action an event."""
    return watch_once(settings, emit=emit_action)


# -- rollouts (a challenger beside the champion) ---------------------------------------------------
@task(name="deploy-challenger", cache_policy=NO_CACHE)
def deploy_challenger_task(
    spec: ModelServeSpec, settings: Settings, remote_cluster: bool, canary: dict[str, Any] | None
) -> None:
    """Start the challenger's Serve app (no HTTP route) and check it answers the champion's smoke request."""
    from tasks.rollout.serve import deploy_challenger

    deploy_challenger(spec, settings, remote_cluster, canary)


@task(name="route-champion", cache_policy=NO_CACHE)
def route_task(record: DeploymentRecord, settings: Settings, remote_cluster: bool, rollout: Any) -> None:
    """Reconfigure the champion's replicas: the challenger's share and mode, or no challenger."""
    from tasks.rollout.serve import route

    route(record, settings, remote_cluster, rollout)


@task(name="gather-rollout-stats", cache_policy=NO_CACHE, timeout_seconds=60)
def gather_stats_task(app_name: str) -> list[dict[str, Any]]:
    """Every running champion replica's comparison stats."""
    from tasks.rollout.serve import gather

    return gather(app_name)


@task(name="publish-rollout-report", cache_policy=NO_CACHE)
def publish_rollout_task(rollout: Any, summary: Any, decision: Any) -> None:
    """The comparison as a table artifact and a markdown artifact with its chart."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from tasks.rollout.report import comparison_rows, latency_chart_png, markdown

    key = re.sub(r"[^a-z0-9-]+", "-", f"rollout-{rollout.model_name}".lower()).strip("-")
    description = f"{rollout.describe()}: {decision.action} ({decision.reason})"
    create_table_artifact(comparison_rows(summary), key=key, description=description[:500])
    chart = latency_chart_png(rollout, summary)
    create_markdown_artifact(markdown(rollout, summary, decision, chart), key=f"{key}-chart")
