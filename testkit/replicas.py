"""Serve's view of an application's replicas, read through the Serve controller of the Ray this
process is connected to (``ray.init`` done by the caller or by nodewise)."""

from __future__ import annotations


def replica_state(replica: dict) -> str:
    """A replica's state as plain text ("RUNNING", "STARTING", ...): Serve gives an enum or a string."""
    state = replica["state"]
    return str(getattr(state, "value", state))


def serve_replicas(app: str, deployment: str = "ModelServer") -> list[dict]:
    """The replicas of ``app``'s ``deployment`` (each with ``state`` as plain text, ``replica_id``,
    ``actor_id``, ``node_id``, ``node_ip``, ``pid``...); none when the app is not deployed."""
    from ray.serve.context import _get_global_client

    applications = _get_global_client().get_serve_details()["applications"]
    if app not in applications:
        return []
    found = applications[app]["deployments"][deployment]["replicas"]
    return [{**replica, "state": replica_state(replica)} for replica in found]


def running_replicas(app: str, deployment: str = "ModelServer") -> dict[str, dict]:
    """The RUNNING replicas of ``app``, by actor id."""
    return {r["actor_id"]: r for r in serve_replicas(app, deployment) if r["state"] == "RUNNING"}
