"""A rollout on Ray Serve: the challenger's app, the champion's routing, and their replicas' stats.

The challenger is its own Serve app (``<app>--challenger``) without an HTTP route: only the
champion's replicas call it (serving/rollout.py). The champion's app is deployed again with the
same spec and a ``rollout`` config: Serve reconfigures its running replicas (none restarts), so
starting, stepping and ending a rollout costs the champion nothing.
"""

from __future__ import annotations

from typing import Any

from nodewise.core.errors import DeployFailed, NotDeployed
from nodewise.core.settings import Settings
from serving.rollout import RolloutConfig
from serving.spec import ModelServeSpec
from tasks.records import DeploymentRecord

CHALLENGER_SUFFIX = "--challenger"


def challenger_app_for(app_name: str) -> str:
    return f"{app_name}{CHALLENGER_SUFFIX}"


def connect_cluster(settings: Settings) -> bool:
    """Connect to the cluster the champion runs on; whether it is a remote one (not ours)."""
    from tasks.rayserve.cluster import connect, current_cluster

    cluster = current_cluster(settings)
    if cluster is None:
        raise NotDeployed("the local Ray instance is not running: deploy the champion first (`nodewise deploy`)")
    connect(cluster)
    return not cluster.owned


def deploy_challenger(spec: ModelServeSpec, settings: Settings, remote: bool, canary: dict[str, Any] | None) -> None:
    """Start (or update) the challenger's app from ``spec`` and check that it answers the champion's
    smoke request; DeployFailed (the app deleted) if it does not."""
    from tasks.rayserve.apps import delete_app, deploy_app

    try:
        deploy_app(spec, settings, remote, routed=False)
        if canary is not None:
            answer = ask(spec.app_name, canary)
            if not answer["ok"]:
                body = answer["body"][:300].decode("utf-8", "replace")
                raise DeployFailed(f"it failed the champion's smoke request: {answer['status']} {body}")
    except DeployFailed:
        delete_app(spec.app_name)
        raise


def ask(app_name: str, request: dict[str, Any], timeout_s: float = 60.0) -> dict[str, Any]:
    """One ``score`` call to one of an app's running replicas (as a champion replica makes it)."""
    import ray

    from serving.errors import encode_json
    from tasks.rayserve.replicas import call_replica

    [actor, *_] = _running_replicas(app_name) or [None]
    if actor is None:
        return {"ok": False, "status": 503, "body": b"no replica is running", "seconds": 0.0}
    return ray.get(call_replica(actor, "score", encode_json(request), "application/json"), timeout=timeout_s)


def _running_replicas(app_name: str) -> list[str]:
    """The actor names of an app's RUNNING replicas."""
    from ray.serve.context import _get_global_client

    from tasks.rayserve.replicas import DEPLOYMENT

    app = _get_global_client().get_serve_details().get("applications", {}).get(app_name, {})
    replicas = app.get("deployments", {}).get(DEPLOYMENT, {}).get("replicas", [])
    return [r["actor_name"] for r in replicas if str(getattr(r["state"], "value", r["state"])) == "RUNNING"]


def route(record: DeploymentRecord, settings: Settings, remote: bool, rollout: RolloutConfig | None) -> None:
    """Tell the champion's replicas of the challenger (or that there is none any more)."""
    from tasks.rayserve.apps import deploy_app

    deploy_app(ModelServeSpec.model_validate(record.spec), settings, remote, rollout=rollout)


def gather(app_name: str, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """Every running champion replica's ``rollout_stats`` (a replica that does not answer in time
    is left out: its requests are counted at the next pass)."""
    import ray

    from tasks.rayserve.replicas import call_replica

    calls = []
    for actor in _running_replicas(app_name):
        try:
            calls.append(call_replica(actor, "rollout_stats"))
        except ValueError:  # gone: Serve is replacing it
            continue
    ready, late = ray.wait(calls, num_returns=len(calls), timeout=timeout_s) if calls else ([], [])
    for ref in late:
        ray.cancel(ref, force=False)
    found = []
    for ref in ready:
        try:
            found.append(ray.get(ref))
        except ray.exceptions.RayError:
            continue
    return [s for s in found if s]


def remove_challenger(app_name: str) -> None:
    from tasks.rayserve.apps import delete_app

    delete_app(challenger_app_for(app_name))


def champion_serves(app_name: str) -> bool:
    from ray import serve

    return app_name in serve.status().applications
