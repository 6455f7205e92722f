"""What nodewise runs right now, and stopping all of it."""

from __future__ import annotations

from typing import Any

from nodewise.core.settings import Settings
from tasks.backends import BACKENDS, backend_for
from tasks.rayserve.cluster import read_local_cluster
from tasks.records import DeploymentRecord, clear_records, load_records


def deployment_status(settings: Settings) -> dict[str, Any]:
    """Recorded deployments (here and on Kubernetes), each with what its backend says of it now:
    health, where it runs (replicas' nodes, ranks' hosts), autoscaling bounds."""
    if settings.ray.address:
        cluster = f"external cluster at {settings.ray.address}"
    else:
        local = read_local_cluster(settings)
        cluster = f"local instance at {local.address}" if local else "local instance not running"
    records = [*load_records(settings.state.records).values(), *load_records(settings.state.k8s_records).values()]
    by_backend: dict[int, list[DeploymentRecord]] = {}
    for r in records:
        by_backend.setdefault(id(backend_for(r.backend)), []).append(r)
    live = {}
    for backend in BACKENDS:
        if id(backend) in by_backend:
            live.update(backend.status(settings, by_backend[id(backend)]))
    rows = [
        {
            "app": r.app_name,
            "model_uri": r.model_uri,
            "version": r.model_version,
            "backend": r.backend,
            "replicas": r.replicas,
            "ranks": None,
            "endpoint": r.endpoint,
            "health": None,
            "deployed_at": r.deployed_at,
            "previous_version": r.previous_version,
            "replaced": r.replaced,
            **live.get(r.app_name, {}),
        }
        for r in records
    ]
    _add_rollouts(settings, rows)
    records_by_app = {r.app_name: r for r in records}
    from tasks.metrics.live import live_figures

    traffic = live_figures(settings) if rows else {}
    for row in rows:
        if row["app"] in traffic:
            row["traffic"] = traffic[row["app"]]
            why = _why_replicas(row, records_by_app.get(row["app"])) if row.get("autoscaling") else None
            if why:
                row["autoscaling"]["why"] = why
    from tasks.watchdog.engine import last_actions

    watchdog = [a.model_dump() for a in last_actions(settings)]
    out: dict[str, Any] = {"cluster": cluster, "deployments": rows, "watchdog": watchdog}
    for backend in BACKENDS:
        nodes = backend.nodes(settings) if id(backend) in by_backend else None
        if nodes is not None:
            out["nodes"] = nodes
            break
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


def stop_everything(settings: Settings) -> list[str]:
    """Stop what every backend runs on this machine (DeepSpeed jobs and their fronts, Serve apps and
    the local Ray instance); a workload on Kubernetes is left alone (``render --delete``).

    Returns what was done.
    """
    done = []
    records = load_records(settings.state.records)
    for backend in BACKENDS:
        if backend.local:
            mine = {n for n, r in records.items() if backend_for(r.backend) is backend} | backend.leftovers(settings)
            done.extend(backend.stop(settings, sorted(mine)))
    clear_records(settings.state.records)
    return done or ["nothing to stop"]


def deployment_logs(settings: Settings, app_name: str, lines: int = 40) -> str:
    """The recent output of a deployment's processes.

    Raises:
        NotDeployed: no such deployment.
    """
    from nodewise.core.errors import NotDeployed

    records = load_records(settings.state.records)
    record = records.get(app_name)
    if record is not None:
        text = backend_for(record.backend).logs(settings, app_name, lines, record)
    else:  # no record (a deploy killed half-way, a job `down` stopped): a backend may keep its output
        said = (b.logs(settings, app_name, lines, None) for b in BACKENDS if b.local)
        text = next((t for t in said if t is not None), None)
    if text is None:
        known = sorted(set(records).union(*(b.leftovers(settings) for b in BACKENDS))) or ["none"]
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
