"""The ``watch_deployments`` flow: one watchdog pass, its actions as Prefect events and a table."""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from nodewise.core.settings import Settings, load_settings
from tasks.watchdog.engine import Action, watch_once


def emit(action: Action) -> None:
    """A Prefect event per action (``nodewise.cluster.restarted``, ...), for automations to act on."""
    emit_event(
        event=action.event,
        resource={"prefect.resource.id": f"nodewise.deployment.{action.app}", "prefect.resource.name": action.app},
        payload=action.model_dump(),
    )


@task(name="watch-once", cache_policy=NO_CACHE)
def watch_once_task(settings: Settings) -> list[Action]:
    """Check every deployment; restart sick DeepSpeed jobs within their budget."""
    return watch_once(settings, emit=emit)


@flow(name="watch-deployments", log_prints=True)
def watch_deployments(settings: Settings | None = None) -> list[Action]:
    """One watchdog pass over every recorded deployment (prefect.yaml schedules it every 30 s)."""
    settings = settings or load_settings()
    actions = watch_once_task(settings)
    for a in actions:
        print(f"{a.event} {a.app} (version {a.version}): {a.cause}" + (f" -> {a.outcome}" if a.outcome else ""))
    if actions:
        create_table_artifact(
            key="nodewise-watchdog",
            table=[a.model_dump() for a in actions],
            description="What the watchdog did in this pass",
        )
    return actions
