"""The ``watch_deployments`` flow: one watchdog pass, its actions as Prefect events and a table."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_table_artifact

from nodewise.core.settings import current_settings
from tasks.steps import watch_once_task
from tasks.watchdog.engine import Action


@flow(name="watch-deployments", log_prints=True)
def watch_deployments() -> list[Action]:
    """One watchdog pass over every recorded deployment (prefect.yaml schedules it every 30 s)."""
    settings = current_settings()  # from the environment or the caller's using_settings: not a parameter
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
