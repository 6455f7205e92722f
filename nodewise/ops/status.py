"""What nodewise runs right now, and stopping all of it."""

from __future__ import annotations

from typing import Any

from nodewise.core.settings import Settings
from tasks.rayserve.cluster import connect, current_cluster, read_local_cluster, stop_local_cluster
from tasks.records import clear_records, load_records


def _health(endpoint: str) -> str:
    import httpx

    try:
        response = httpx.get(f"{endpoint}/ping", timeout=2.0)
    except httpx.TransportError:
        return "unreachable"
    if response.status_code == 200:
        return "healthy"
    try:  # DeepSpeed's rank 0 says which ranks are the trouble
        problems = "; ".join(response.json().get("problems", []))
    except ValueError:
        problems = ""
    return f"unhealthy (HTTP {response.status_code}{': ' + problems if problems else ''})"


def deployment_status(settings: Settings) -> dict[str, Any]:
    """Recorded deployments with a live health check of each endpoint."""
    if settings.ray.address:
        cluster = f"external cluster at {settings.ray.address}"
    else:
        local = read_local_cluster(settings)
        cluster = f"local instance at {local.address}" if local else "local instance not running"
    records = list(load_records(settings.state.records).values())
    rows = [
        {
            "app": r.app_name,
            "model_uri": r.model_uri,
            "version": r.model_version,
            "backend": r.backend,
            "replicas": r.replicas,
            "ranks": r.spec.get("tp_size", 1) if r.backend == "deepspeed_mpi" else None,
            "endpoint": r.endpoint,
            "health": None,
            "deployed_at": r.deployed_at,
            "previous_version": r.previous_version,
        }
        for r in records
    ]
    for row, record in zip(rows, records, strict=True):
        if row["backend"] == "deepspeed_mpi":
            row.update(_where_ranks_run(settings, row["app"]))
            row["health"] = _health(row["endpoint"])
        elif record.spec.get("max_replicas", 1) > record.spec.get("min_replicas", 1):
            row["autoscaling"] = {
                "min_replicas": record.spec["min_replicas"],
                "max_replicas": record.spec["max_replicas"],
                "ceiling": record.spec.get("ceiling_reason") or "max_replicas",
            }
    from tasks.watchdog.replicas import replica_nodes

    placed = replica_nodes(settings, [r["app"] for r in rows if r["backend"] != "deepspeed_mpi"])
    for row, record in zip(rows, records, strict=True):
        if row["app"] in placed:
            row["replica_nodes"] = placed[row["app"]]
        if row["health"] is None:
            # a model scaled to zero has no replica to answer: a ping would start one
            idle = record.spec.get("min_replicas") == 0 and row["app"] in placed and not placed[row["app"]]
            row["health"] = "scaled to zero (the next request starts a replica)" if idle else _health(row["endpoint"])
    rows += [
        {
            "app": r.app_name,
            "model_uri": r.model_uri,
            "version": r.model_version,
            "backend": r.backend,
            "replicas": r.replicas,
            "ranks": None,
            "endpoint": r.endpoint,
            "health": "on Kubernetes: the watchdog checks its pods (kubectl shows them)",
            "deployed_at": r.deployed_at,
            "previous_version": r.previous_version,
        }
        for r in load_records(settings.state.k8s_records).values()
    ]
    _add_rollouts(settings, rows)
    records_by_app = {r.app_name: r for r in records}
    from tasks.metrics.live import live_figures

    live = live_figures(settings) if rows else {}
    for row in rows:
        if row["app"] in live:
            row["traffic"] = live[row["app"]]
            why = _why_replicas(row, records_by_app.get(row["app"])) if row.get("autoscaling") else None
            if why:
                row["autoscaling"]["why"] = why
    from tasks.watchdog.engine import last_actions
    from tasks.watchdog.replicas import cluster_nodes

    watchdog = [a.model_dump() for a in last_actions(settings)]
    out: dict[str, Any] = {"cluster": cluster, "deployments": rows, "watchdog": watchdog}
    nodes = cluster_nodes(settings) if rows and any(r["backend"] == "ray_serve" for r in rows) else None
    if nodes is not None:
        out["nodes"] = {**nodes, "max_added_nodes": None if settings.ray.address else settings.ray.max_added_nodes}
    return out


def _add_rollouts(settings: Settings, rows: list[dict[str, Any]]) -> None:
    """Each deployment's challenger (which versions serve its route, in which mode, with what share),
    and the last rollout decision on the model."""
    from nodewise.core.state import read_json
    from tasks.rollout.store import load

    rollouts = {r.app_name: r for r in load(settings.state.rollouts).values()}
    history = read_json(settings.state.promotions).get("history", [])
    for row in rows:
        rollout = rollouts.get(row["app"])
        if rollout is not None:
            last = (rollout.last or {}).get("decision")
            row["rollout"] = {
                "challenger_version": rollout.challenger_version,
                "mode": rollout.mode,
                "share": rollout.share,
                "step": f"{rollout.step + 1} of {len(rollout.shares)}",
                "phase": rollout.phase,
                "started_at": rollout.started_at,
                "summary": rollout.describe(),
                "last_decision": last and f"{last['at']} {last['action']}: {last['reason']}",
            }
        name = row["model_uri"].split("/")[1] if row["model_uri"].startswith("models:/") else None
        decided = [h for h in history if h["model"] == name and h["outcome"].startswith(_ROLLOUT_OUTCOMES)]
        if decided:
            row["last_rollout"] = f"{decided[-1]['at']} version {decided[-1]['version']} {decided[-1]['outcome']}"


_ROLLOUT_OUTCOMES = ("promoted from rollout", "rolled back")


def _where_ranks_run(settings: Settings, app_name: str) -> dict[str, Any]:
    """A DeepSpeed job's hosts now: each rank's, the spares, and rank 0's endpoint (it moves with rank 0)."""
    from nodewise.core.errors import ClusterUnavailable
    from tasks.mpi.records import read_cluster, read_placement

    try:
        placement = read_placement(settings, app_name)
    except ClusterUnavailable:
        return {}
    where: dict[str, Any] = {
        "hosts": placement.hosts,
        "rank_hosts": [h for h in placement.hosts for _ in range(placement.ranks_per_host)],
        "spare_hosts": placement.spares,
    }
    from tasks.mpi.front import front_state, hold_line, read_front

    cluster = read_cluster(settings, app_name)
    front = read_front(settings, app_name)
    if front is not None:  # users call the front, which outlives the group; rank 0 sits behind it
        where["endpoint"] = front.endpoint
        state = front_state(front)
        where["front"] = (hold_line(state) or "serving") if state is not None else "not answering"
        if cluster is not None:
            where["rank0_endpoint"] = cluster.endpoint
    elif cluster is not None:
        where["endpoint"] = cluster.endpoint
    return where


def stop_everything(settings: Settings) -> list[str]:
    """Stop nodewise's DeepSpeed jobs, delete its Serve apps and stop its local Ray instance.

    Returns what was done.
    """
    from tasks.mpi.front import stop_front
    from tasks.mpi.launcher import stop_cluster
    from tasks.mpi.records import launched_apps

    done = []
    records = load_records(settings.state.records)
    for name in sorted(launched_apps(settings) | {n for n, r in records.items() if r.backend == "deepspeed_mpi"}):
        done.extend(stop_cluster(settings, name))
        done.extend(stop_front(settings, name))  # the front outlives restarts, not a stop
    records = {n: r for n, r in records.items() if r.backend != "deepspeed_mpi"}
    if settings.ray.address:
        if records:
            from tasks.rayserve.apps import delete_app

            connect(current_cluster(settings))
            for name in records:
                delete_app(name)
                done.append(f"deleted Serve app {name}")
    elif stop_local_cluster(settings):
        done.extend(f"deleted Serve app {name}" for name in records)
        done.append("stopped the local Ray instance")
    clear_records(settings.state.records)
    return done or ["nothing to stop"]


def deployment_logs(settings: Settings, app_name: str, lines: int = 40) -> str:
    """The recent output of a deployment's processes.

    Raises:
        NotDeployed: no such deployment.
    """
    from nodewise.core.errors import NotDeployed
    from tasks.mpi.health import app_log
    from tasks.mpi.records import launched_apps

    records = load_records(settings.state.records)
    record = records.get(app_name)
    if record is not None and record.backend == "ray_serve":
        where = f"{settings.state.ray_temp}/session_latest/logs" if not settings.ray.address else "the cluster's nodes"
        return f"{app_name} runs on Ray Serve: its replicas log to {where} (files named replica_{app_name}_*)"
    text = app_log(settings, app_name, lines)
    if text is None:
        known = sorted(set(records) | launched_apps(settings)) or ["none"]
        raise NotDeployed(f"no deployment named {app_name!r}; deployments: {', '.join(known)}")
    return text


def _why_replicas(row: dict[str, Any], record: Any) -> str | None:
    """Why an autoscaled deployment has the replicas it has: its replicas' load now, read from their
    metrics as the autoscaling policy reads it (serving/autoscaling.py), the replicas that asks for,
    and the ceiling."""
    from serving.autoscaling import explain

    load, bounds = row["traffic"].get("load") or {}, row["autoscaling"]
    if record is None or "in_flight" not in load:
        return None
    if record.spec.get("engine"):
        budget = load.get("token_budget") or 0.0
        seen = {
            "rule": "engine",
            "waiting": load.get("blocked", 0.0),  # what the policy counts (Engine.blocked), not all waiting
            "budget_used": load.get("tokens_in_flight", 0.0) / budget if budget else 0.0,
        }
    else:
        seen = {
            "rule": "requests",
            "load": load["in_flight"],
            "target": record.spec.get("target_ongoing_requests", 2.0),  # the spec default
        }
    running = sum(r["state"] == "RUNNING" for r in row.get("replica_nodes", []))
    return explain(seen, running, bounds["min_replicas"], bounds["max_replicas"])
