"""Calling one Ray Serve replica directly (its actor, not through the router).

``call_replica`` uses the replica actor's ``handle_request`` with a pickled ``RequestMetadata``
naming the user method: the path Serve's own router takes, internal to Ray Serve 2.60 (pinned in
pyproject.toml) and kept to this one function. The watchdog asks each replica for its vitals this
way, the rollout's decision flow for its stats, and the metrics for its scrape target.
"""

from __future__ import annotations

from typing import Any

DEPLOYMENT = "ModelServer"  # serving/app.py's deployment name


def call_replica(actor_name: str, method: str, *args: Any) -> Any:
    """Start ``ModelServer.<method>(*args)`` on one replica, its ObjectRef (Serve's replica actor API,
    Ray Serve 2.60). ValueError: the actor is gone."""
    import pickle
    import uuid

    import ray
    from ray.serve._private.common import RequestMetadata

    actor = ray.get_actor(actor_name, namespace="serve")
    meta = RequestMetadata(
        request_id=f"nodewise-{method}-{uuid.uuid4().hex[:8]}",
        internal_request_id=uuid.uuid4().hex,
        call_method=method,
    )
    return actor.handle_request.remote(pickle.dumps(meta), *args)


def replicas_of(app_name: str) -> list[dict[str, Any]] | None:
    """The replicas Serve lists for ``app_name`` (replica_id, actor_name, state, node_ip, ...), or
    None when Serve has no such app. The caller is connected to the cluster."""
    from ray.serve.context import _get_global_client

    app = _get_global_client().get_serve_details().get("applications", {}).get(app_name)
    if app is None:
        return None
    return list(app.get("deployments", {}).get(DEPLOYMENT, {}).get("replicas", []))


def metrics_addresses(app_name: str) -> dict[str, str | None]:
    """Ask each running replica of ``app_name`` for its metrics address (the caller is connected to
    the cluster): replica id -> ``host:port``, or None where it did not answer."""
    import ray

    calls = {}
    for replica in replicas_of(app_name) or []:
        if str(replica.get("state", "")).endswith("RUNNING"):
            try:
                calls[replica["replica_id"]] = call_replica(replica["actor_name"], "metrics_target")
            except ValueError:  # gone already
                continue
    found: dict[str, str | None] = {}
    for replica_id, ref in calls.items():
        try:
            target = ray.get(ref, timeout=10)
        except ray.exceptions.RayError:
            target = None
        found[replica_id] = target["address"] if target else None
    return found
