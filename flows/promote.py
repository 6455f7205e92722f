"""The ``deploy-registered-model`` flow: what a registry promotion (or a person in the Prefect UI) starts.

Typed parameters for a clean form: the model's name, the alias to follow (or a version), the
target, the inventory. Promotions of one model are serialized (a lock per model in the state
folder) and each run deploys the alias's target as it is when the run starts, so two quick
promotions end with the newest version serving. A failed deploy leaves the previous version
serving (``deploy_model`` rolls back), is recorded and emits ``nodewise.deploy.failed``; a
successful one points the alias ``previous`` at the version it replaced.
"""

from __future__ import annotations

import time
from typing import Literal

from prefect import flow
from prefect.events import emit_event

from nodewise.core.errors import InvalidInput, NodewiseError
from nodewise.core.settings import Settings, current_settings
from tasks.records import deploy_lock
from tasks.triggers.promotion import PREVIOUS_ALIAS, alias_target, record_outcome, serving_version


@flow(name="deploy-registered-model", log_prints=True, validate_parameters=True)
def deploy_registered_model(
    model_name: str,
    alias: str | None = "champion",
    version: str | None = None,
    target: Literal["local", "kubernetes"] = "local",
    inventory: str = "local",
) -> str:
    """Deploy ``model_name`` at ``alias``'s current version (or at ``version``); returns what happened.

    Args:
        model_name: the registered model's name.
        alias: the alias to follow (its target when the run starts); ignored when ``version`` is given.
        version: a version number to deploy instead of the alias's.
        target: ``local`` (this machine's Ray or mpirun) or ``kubernetes`` (render and apply).
        inventory: where it may run: ``local``, ``nvml``, ``ray[:ADDRESS]``, ``k8s`` or a YAML file.
    """
    settings = current_settings()
    if not (version or alias):
        raise InvalidInput("give an alias (e.g. champion) or a version to deploy")
    from tasks.planning.registry import make_client

    client = make_client(settings.tracking_uri, settings.registry_uri)
    history = settings.state.promotions
    with deploy_lock(settings.state, model_name):
        wanted = str(version) if version else alias_target(client, model_name, str(alias))
        uri = f"models:/{model_name}/{wanted}"
        before = serving_version(settings.state.records, model_name)
        if before == wanted and target == "local":
            print(f"{uri} already serves: nothing to do")
            return f"{uri} already serves"
        started = time.monotonic()
        try:
            where = _deploy(uri, target, inventory, settings)
        except NodewiseError as e:
            record_outcome(history, model_name, wanted, f"failed: {e}")
            emit_event(
                event="nodewise.deploy.failed",
                resource={"prefect.resource.id": f"mlflow.model.{model_name}", "prefect.resource.name": model_name},
                payload={"model": model_name, "version": wanted, "error": str(e), "still_serving": before},
            )
            raise
        if before and before != wanted:
            client.set_registered_model_alias(model_name, PREVIOUS_ALIAS, before)
            print(f"alias {PREVIOUS_ALIAS!r} now points at version {before}, the one replaced")
        record_outcome(history, model_name, wanted, f"serving at {where}", time.monotonic() - started)
        return f"{uri} serves at {where}"


def _deploy(uri: str, target: str, inventory: str, settings: Settings) -> str:
    if target == "kubernetes":
        from tasks.k8s.deploy import apply_rendered, manifests_for

        return apply_rendered(manifests_for(uri, inventory, settings), settings).endpoint
    from flows.deploy import deploy_model

    return deploy_model(uri, inventory=inventory).endpoint  # a subflow: the same settings context
