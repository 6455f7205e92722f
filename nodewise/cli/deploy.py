"""`nodewise deploy` (and the demo's deploys): run the deploy flow and print its outcome."""

from __future__ import annotations

from typing import Any

import typer

from nodewise.core.settings import Settings, using_settings


def deploy_and_report(uri: str, replicas: int | None, settings: Settings, inventory: str = "local") -> Any:
    """Run the deploy flow on ``uri`` with ``settings`` and print where it went and its plan.

    Returns:
        The deployment's record (its endpoint, version and plan).
    """
    from flows.deploy import deploy_model

    with using_settings(settings):
        record = deploy_model(uri, replicas=replicas, inventory=inventory)
    typer.echo(f"deployed {record.model_uri} (version {record.model_version}) -> {record.endpoint}")
    typer.echo(f"plan: {record.plan}")
    return record
