"""The watchdog's Ray Serve half: every replica checked on its own, a sick one restarted alone.

``watch_app`` is the Ray Serve backend's ``watch`` (tasks/rayserve/backend.py); budgets and events
are the engine's (tasks/watchdog/engine.py), through ``WatchPass``.

Each RUNNING replica is called directly (its actor, not through the router) for its vitals: a
canary inference with a deadline, its resident memory and its error rate over the last
``error_window_s``. A replica that misses the deadline (hung, or too slow), fails the canary,
fails too many requests or outgrows ``memory_limit_bytes`` is killed; Ray Serve starts a
replacement while the other replicas keep their identity and keep serving. Replicas that cannot
be placed (a node gone, no capacity left) are reported as degraded with Serve's reason and the
dead nodes: restarting would not help them.

The direct call uses Ray Serve's replica actor method ``handle_request`` with a pickled
``RequestMetadata`` naming the user method (``ModelServer.vitals``): the path Serve's own router
takes, internal to Ray Serve 2.60 (pinned in pyproject.toml) and kept to ``call_replica``
(tasks/rayserve/replicas.py; the rollout's decision flow and the metrics' targets call it too).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from pydantic import BaseModel

from nodewise.core.settings import Settings, WatchdogSettings
from tasks.backend import Action, WatchPass
from tasks.rayserve.replicas import DEPLOYMENT, call_replica
from tasks.records import DeploymentRecord

__all__ = ["DEPLOYMENT", "call_replica"]  # and what is defined below


class ReplicaView(BaseModel):
    """One replica as Serve lists it, with what its vitals call returned."""

    replica_id: str
    actor_name: str
    state: str
    pid: int | None = None
    node_id: str | None = None
    node_ip: str | None = None
    vitals: dict[str, Any] | None = None
    unreachable: str | None = None  # why the vitals call gave nothing

    def describe(self) -> str:
        return f"replica {self.replica_id} (pid {self.pid} on {self.node_ip or 'an unknown node'})"


class AppView(BaseModel):
    """A Serve app's replicas and what Serve says of them."""

    app: str
    status: str
    message: str = ""
    target: int = 0
    replicas: list[ReplicaView] = []
    dead_nodes: list[str] = []


# -- what is wrong (plain functions of a view) -----------------------------------------------------
def replica_problem(replica: ReplicaView, max_error_rate: float, wd: WatchdogSettings) -> str | None:
    """Why this replica should be restarted, or None."""
    if replica.unreachable is not None:
        return replica.unreachable
    v = replica.vitals
    if v is None:
        return None
    if v.get("canary_error"):
        return f"canary inference failed: {v['canary_error']}"
    limit = v.get("memory_limit_bytes")
    if limit and v["rss_bytes"] > limit:
        return f"memory {v['rss_bytes'] / 2**20:.0f} MiB is past its limit {limit / 2**20:.0f} MiB"
    requests, errors = v.get("requests", 0), v.get("errors", 0)
    if requests >= wd.min_requests and errors / requests >= max_error_rate:
        return f"{errors} of {requests} requests failed in the last {v.get('window_s', wd.error_window_s):.0f} s"
    return None


def degraded_cause(view: AppView) -> str | None:
    """Why the app has fewer running replicas than it should, when a restart cannot fix it."""
    running = sum(r.state == "RUNNING" for r in view.replicas)
    if running >= view.target and view.status not in ("UNHEALTHY", "DEPLOY_FAILED"):
        return None
    if view.status in ("UPDATING", "DEPLOYING", "UPSCALING", "DOWNSCALING") and "to be scheduled" not in view.message:
        return None  # a rollout or a scale-up under way
    waiting = [r for r in view.replicas if r.state != "RUNNING"]
    parts = [f"{running} of {view.target} replicas running"]
    if waiting:
        parts.append(f"{len(waiting)} waiting ({', '.join(sorted({r.state for r in waiting}))})")
    if view.message:
        parts.append(f"Serve: {_first_sentences(view.message)}")
    if view.dead_nodes:
        parts.append(f"dead nodes: {', '.join(view.dead_nodes)}")
    return "; ".join(parts)


def pick_sick(view: AppView, max_error_rate: float, wd: WatchdogSettings) -> tuple[ReplicaView, str] | None:
    """The replica to restart in this pass, with why: one per pass, so the others keep serving."""
    for replica in view.replicas:
        cause = replica_problem(replica, max_error_rate, wd)
        if cause is not None:
            return replica, cause
    return None


def _first_sentences(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- looking (real Ray) ----------------------------------------------------------------------------
def connect_for(settings: Settings) -> str | None:
    """Connect this process to the cluster the Serve apps run on; why not, or None."""
    from nodewise.core.errors import ClusterUnavailable
    from tasks.rayserve.cluster import connect, current_cluster

    cluster = current_cluster(settings)
    if cluster is None:
        return "the local Ray instance is not running (`nodewise deploy` starts it)"
    try:
        connect(cluster)
    except ClusterUnavailable as e:
        return str(e)
    return None


def replica_nodes(settings: Settings, app_names: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Each app's replicas as Serve places them (state, node address, pid); {} when Ray is not up."""
    if not app_names or connect_for(settings) is not None:
        return {}
    from ray.serve.context import _get_global_client

    apps = _get_global_client().get_serve_details().get("applications", {})
    out: dict[str, list[dict[str, Any]]] = {}
    for name in app_names:
        replicas = apps.get(name, {}).get("deployments", {}).get(DEPLOYMENT, {}).get("replicas", [])
        out[name] = [{"state": _value(r["state"]), "node": r.get("node_ip"), "pid": r.get("pid")} for r in replicas]
    return out


def cluster_nodes(settings: Settings) -> dict[str, Any] | None:
    """The Ray nodes now: the live ones (the head first) and those gone (removed by the autoscaler,
    or dead); None when Ray is not up."""
    if connect_for(settings) is not None:
        return None
    import ray

    alive, gone = [], []
    for node in ray.nodes():
        view = {
            "node_id": node["NodeID"],
            "address": node["NodeManagerAddress"],
            "cpus": node.get("Resources", {}).get("CPU", 0.0),
            "head": "node:__internal_head__" in node.get("Resources", {}),
        }
        (alive if node["Alive"] else gone).append(view)
    alive.sort(key=lambda n: not n["head"])
    return {"alive": alive, "removed": gone}


def observe(record: DeploymentRecord, wd: WatchdogSettings) -> AppView | None:
    """The app's replicas with every RUNNING replica's vitals (None: Serve has no such app)."""
    import json

    import ray
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    app = details.get("applications", {}).get(record.app_name)
    if app is None:
        return None
    deployment = app.get("deployments", {}).get(DEPLOYMENT, {})
    replicas = [
        ReplicaView(
            replica_id=r["replica_id"],
            actor_name=r["actor_name"],
            state=_value(r["state"]),
            pid=r.get("pid"),
            node_id=r.get("node_id"),
            node_ip=r.get("node_ip"),
        )
        for r in deployment.get("replicas", [])
    ]
    canary = json.dumps(record.canary).encode() if record.canary is not None else None
    calls = {}
    for replica in replicas:
        if replica.state == "RUNNING":
            try:
                calls[call_replica(replica.actor_name, "vitals", canary, wd.error_window_s)] = replica
            except ValueError:  # the actor is gone already: Serve is replacing it
                replica.state = "STOPPING"
    ready, late = ray.wait(list(calls), num_returns=len(calls), timeout=wd.canary_timeout_s) if calls else ([], [])
    for ref in ready:
        replica = calls[ref]
        try:
            replica.vitals = ray.get(ref)
        except ray.exceptions.RayActorError:
            replica.state = "STOPPING"  # died while we asked: Serve replaces a dead replica itself
        except ray.exceptions.RayError as e:
            replica.unreachable = f"vitals call failed: {type(e).__name__}"
    for ref in late:
        calls[ref].unreachable = f"canary inference took over {wd.canary_timeout_s:.0f} s (hung or overloaded)"
        ray.cancel(ref, force=False)
    return AppView(
        app=record.app_name,
        status=_value(deployment.get("status", app.get("status", ""))),
        message=deployment.get("message", "") or app.get("message", ""),
        target=record.replicas if deployment.get("target_num_replicas") is None else deployment["target_num_replicas"],
        replicas=replicas,
        dead_nodes=_dead_nodes({r.node_id for r in replicas}),
    )


def _dead_nodes(known: set[str | None]) -> list[str]:
    """Nodes Ray marks dead (those that held this app's replicas first), as 'IP (id8)'."""
    import ray

    dead = [n for n in ray.nodes() if not n.get("Alive")]
    dead.sort(key=lambda n: n.get("NodeID") not in known)
    return [f"{n.get('NodeManagerAddress', '?')} ({str(n.get('NodeID', ''))[:8]})" for n in dead[:5]]


def _value(status: Any) -> str:
    return str(getattr(status, "value", status))


# -- acting ----------------------------------------------------------------------------------------
def restart_replica(replica: ReplicaView, settings: Settings) -> tuple[float, str]:
    """Kill one replica; wait until Serve runs a replacement. Returns (seconds, outcome)."""
    import ray

    started = time.monotonic()
    with contextlib.suppress(ValueError):  # gone already: only the replacement is left to wait for
        ray.kill(ray.get_actor(replica.actor_name, namespace="serve"), no_restart=True)
    return wait_replaced(replica, settings, started)


def wait_replaced(replica: ReplicaView, settings: Settings, started: float | None = None) -> tuple[float, str]:
    """Wait until ``replica`` is gone and the app has its target of RUNNING replicas."""
    from ray.serve.context import _get_global_client

    started = time.monotonic() if started is None else started
    app_name = replica.actor_name.split("::", 1)[-1].split("#", 1)[0]
    deadline = started + settings.serve.ready_timeout_s
    while time.monotonic() < deadline:
        app = _get_global_client().get_serve_details().get("applications", {}).get(app_name)
        deployment = (app or {}).get("deployments", {}).get(DEPLOYMENT, {})
        replicas = deployment.get("replicas", [])
        running = sum(_value(r["state"]) == "RUNNING" for r in replicas)
        gone = all(r["replica_id"] != replica.replica_id for r in replicas)
        if gone and running >= (deployment.get("target_num_replicas") or 1):
            return time.monotonic() - started, f"replaced; {running} replicas running"
        time.sleep(0.25)
    return (
        time.monotonic() - started,
        f"no replacement running after {settings.serve.ready_timeout_s:.0f} s (see `nodewise status`)",
    )


# -- one watchdog check ----------------------------------------------------------------------------
REPLICA_PENDING = "replica restart: "


def watch_app(settings: Settings, record: DeploymentRecord, this: WatchPass) -> list[Action]:
    """One check of ``record``'s replicas: a sick one restarted within the budget, the others serving."""
    why_not = connect_for(settings)
    if why_not is not None:
        return this.degraded(why_not)
    watch = this.watch
    if watch.pending is not None and watch.pending.startswith(REPLICA_PENDING):  # a killed watchdog's restart
        name = watch.pending.removeprefix(REPLICA_PENDING)
        replica = ReplicaView(replica_id=name.rsplit("#", 1)[-1], actor_name=name, state="STOPPING")
        took, outcome = restart_replica(replica, settings)
        watch.pending = None
        cause = "finishing an interrupted replica restart"
        return [
            this.action(
                "nodewise.replica.restarted",
                cause,
                target=replica.describe(),
                duration_s=round(took, 2),
                outcome=outcome,
            )
        ]
    view = observe(record, settings.watchdog)
    if view is not None and record.spec.get("metrics", True):  # replicas come and go: their scrape targets follow
        this.scrape_targets({r.replica_id: (r.vitals or {}).get("metrics_address") for r in view.replicas})
    watch.running = None if view is None else sum(r.state == "RUNNING" for r in view.replicas)
    if view is None:
        return this.degraded(f"Serve has no app {record.app_name!r} (was Ray restarted?): run `nodewise deploy` again")
    done = _replaced_by_serve(this, view) + this.degraded(degraded_cause(view))
    sick = pick_sick(view, float(record.spec.get("max_error_rate", 0.5)), settings.watchdog)
    if sick is not None:
        replica, cause = sick

        def restart() -> tuple[float, str]:
            return restart_replica(replica, settings)

        watch.restarted = [*watch.restarted[-9:], replica.replica_id]  # its replacement is not Serve's own
        pending = REPLICA_PENDING + replica.actor_name
        done.append(this.budgeted("nodewise.replica.restarted", cause, replica.describe(), restart, pending))
    return done


def _replaced_by_serve(this: WatchPass, view: AppView) -> list[Action]:
    """Replicas that left since the last pass while the app kept its size: Serve replaced them (a
    replica that died: its process killed, or its node lost). Counted, never acted on."""
    watch = this.watch
    seen = [r.replica_id for r in view.replicas]
    gone = [r for r in watch.replicas if r not in seen and r not in watch.restarted]
    shrunk = view.target < len(watch.replicas)  # a scale-down removes replicas on purpose
    watch.replicas = seen
    if shrunk:
        return []
    return [
        this.action("nodewise.replica.replaced", "the replica exited; Serve started another", target=f"replica {r}")
        for r in gone
    ]
