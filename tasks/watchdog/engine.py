"""The watchdog: check every deployment, restart what is sick within a budget, say what it did.

Ray Serve apps are checked replica by replica (tasks/watchdog/replicas.py): a hung, failing or
leaking replica is restarted alone, one per pass, while the others keep serving; replicas that
cannot be placed are reported as degraded with the cause. DeepSpeed jobs are checked through
mpirun (still running?), rank 0's ``/health`` (every rank's heartbeat and step) and a canary
inference with a deadline; a sick job is restarted whole (every rank stopped, all relaunched
with a fresh rendezvous port, then waited for), because the survivors of a lost rank cannot go
on alone.

Restarts are budgeted per deployment: at most ``max_restarts`` per ``window_s``, with a backoff
that doubles after each; past the budget the deployment is marked failed and left alone until a
deploy or ``reset`` clears it. State lives in ``<state>/watchdog.json``; one watchdog acts at a
time (a lock file), and a restart that a killed watchdog left half-done is finished by the next.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from nodewise.core.errors import Busy, DeployFailed, NodewiseError, NotDeployed, NotEnoughHosts
from nodewise.core.settings import Settings, WatchdogSettings
from nodewise.core.state import read_json, try_lock, write_json
from tasks.records import DeploymentRecord, load_records

ActionKind = Literal[
    "nodewise.replica.restarted",
    "nodewise.replica.replaced",
    "nodewise.cluster.restarted",
    "nodewise.deployment.degraded",
    "nodewise.deployment.recovered",
    "nodewise.deployment.failed",
    "nodewise.deployment.backoff",
    "nodewise.front.held",
]
KEEP_ACTIONS = 50


class Action(BaseModel):
    """One thing the watchdog saw or did."""

    at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    event: ActionKind
    app: str
    model_uri: str
    version: str
    cause: str
    target: str = "all ranks"
    duration_s: float | None = None
    outcome: str = ""
    hosts_before: list[str] | None = Field(default=None, description="A multi-node job's hosts before a restart.")
    hosts_after: list[str] | None = Field(default=None, description="... and after it (a host that is down replaced).")
    counts: dict[str, int] | None = Field(
        default=None, description="nodewise.front.held: held, retried, continued, refused since the last pass."
    )


class AppWatch(BaseModel):
    """What the watchdog remembers of one deployment."""

    restarts: list[float] = Field(default_factory=list, description="Epoch seconds of recent restarts.")
    failed: str | None = Field(default=None, description="Why the budget ran out; the watchdog leaves it alone.")
    pending: str | None = Field(default=None, description="A restart begun and not finished.")
    degraded: str | None = Field(default=None, description="The degradation last reported (reported once).")
    version: str | None = None
    deployed_at: str | None = Field(default=None, description="The deploy this budget belongs to.")
    running: int | None = Field(default=None, description="Replicas running at the last pass (Ray Serve).")
    replicas: list[str] = Field(default_factory=list, description="Replica ids seen at the last pass (Ray Serve).")
    restarted: list[str] = Field(default_factory=list, description="Replica ids this watchdog restarted itself.")
    front: dict[str, int] = Field(default_factory=dict, description="The front's counts at the last pass (DeepSpeed).")


# -- the budget (plain arithmetic) ----------------------------------------------------------------
def budget(restarts: list[float], now: float, wd: WatchdogSettings) -> tuple[str, float]:
    """``("allow", 0)``, ``("wait", seconds)`` until backoff ends, or ``("exhausted", 0)``."""
    recent = [t for t in restarts if now - t < wd.window_s]
    if len(recent) >= wd.max_restarts:
        return "exhausted", 0.0
    if recent:
        backoff = min(wd.backoff_max_s, wd.backoff_s * 2 ** (len(recent) - 1))
        left = max(recent) + backoff - now
        if left > 0:
            return "wait", left
    return "allow", 0.0


# -- state ---------------------------------------------------------------------------------------
def load_watch(settings: Settings) -> tuple[dict[str, AppWatch], list[Action]]:
    data = read_json(settings.state.watchdog)
    apps = {k: AppWatch.model_validate(v) for k, v in data.get("apps", {}).items()}
    return apps, [Action.model_validate(a) for a in data.get("actions", [])]


def save_watch(settings: Settings, apps: dict[str, AppWatch], actions: list[Action]) -> None:
    body = {
        "apps": {k: v.model_dump() for k, v in apps.items()},
        "actions": [a.model_dump() for a in actions[-KEEP_ACTIONS:]],
    }
    write_json(settings.state.watchdog, body)  # one watchdog at a time writes it (the lock below)


def reset(settings: Settings, app_name: str) -> str:
    """Let the watchdog act on ``app_name`` again (clears its failed mark and its restart history)."""
    with try_lock(settings.state.watchdog_lock) as got:
        if not got:
            raise Busy("a watchdog run holds the lock; try again in a few seconds")
        apps, actions = load_watch(settings)
        if app_name not in apps:
            raise NotDeployed(f"the watchdog has nothing on {app_name!r}; watched: {', '.join(sorted(apps)) or 'none'}")
        apps[app_name] = AppWatch()
        save_watch(settings, apps, actions)
    return f"{app_name}: restart budget reset; the watchdog watches it again"


# -- checks --------------------------------------------------------------------------------------
CANARY_IDS = [[0, 1, 2, 3]]  # valid token ids for any vocabulary


def check_deepspeed(settings: Settings, record: DeploymentRecord) -> str | None:
    """Why the DeepSpeed job is sick, or None when every rank is ready and a canary answers in time."""
    import httpx

    from tasks.mpi.health import exit_code, health, worker_error
    from tasks.mpi.records import read_cluster

    cluster = read_cluster(settings, record.app_name)
    if cluster is None:
        return "no job is running (stopped, or a restart was interrupted)"
    code = exit_code(cluster)
    if code is not None:
        return f"mpirun exited (status {code}): " + (worker_error(cluster) or "a rank died, so mpirun stopped them all")
    timeout = settings.watchdog.canary_timeout_s
    state = health(cluster, timeout_s=timeout)
    if not state.get("ready"):
        return "; ".join(state.get("problems", [])) or "rank 0 says not ready"
    try:
        response = httpx.post(f"{cluster.endpoint}/invocations", json={"inputs": CANARY_IDS}, timeout=timeout)
    except httpx.TimeoutException:
        return f"canary inference took over {timeout:.0f} s"
    except httpx.HTTPError as e:
        return f"canary inference failed: {type(e).__name__}"
    if response.status_code != 200:
        return f"canary inference answered HTTP {response.status_code}: {response.text[:200]}"
    return None


def restart_deepspeed(settings: Settings, record: DeploymentRecord) -> tuple[float, list[str]]:
    """Stop every rank, relaunch all with a fresh rendezvous port (a host that is down replaced by a
    spare), wait until every rank is ready. Returns the seconds it took and the hosts it runs on.

    The front (when there is one) reads rank 0's address from the new group's record, wherever
    rank 0 now runs; its own record notes it too."""
    from serving.spec import DeepSpeedSpec
    from tasks.mpi.front import follow
    from tasks.mpi.health import wait_ready
    from tasks.mpi.launcher import relaunch

    started = time.monotonic()
    cluster = relaunch(settings, record.app_name, DeepSpeedSpec.model_validate(record.spec))
    wait_ready(cluster, settings.deepspeed.ready_timeout_s)
    follow(settings, record.app_name, cluster.endpoint)
    return time.monotonic() - started, cluster.hosts


# -- one pass ------------------------------------------------------------------------------------
def watch_once(settings: Settings, emit: Callable[[Action], None] | None = None) -> list[Action]:
    """Check every recorded deployment once; restart sick replicas and jobs within their budget.

    Returns the actions of this pass (each also given to ``emit``). Another watchdog holding
    the lock makes this pass a no-op.
    """
    emit = emit or (lambda action: None)
    with try_lock(settings.state.watchdog_lock) as got:
        if not got:
            return []
        apps, history = load_watch(settings)
        done: list[Action] = []
        for record in load_records(settings.state.records).values():
            fresh = AppWatch(version=record.model_version, deployed_at=record.deployed_at)
            watch = apps.setdefault(record.app_name, fresh)
            if watch.deployed_at != record.deployed_at:  # a deploy since: a fresh budget
                watch = apps[record.app_name] = fresh
            actions = _watch_one(settings, record, watch)
            for action in actions:
                done.append(action)
                emit(action)
            save_watch(settings, apps, history + done)  # after each deployment: a kill loses little
            count_actions(settings, actions)
        for record in load_records(settings.state.k8s_records).values():  # what `render --apply` put on Kubernetes
            fresh = AppWatch(version=record.model_version, deployed_at=record.deployed_at)
            watch = apps.setdefault(record.app_name, fresh)
            if watch.deployed_at != record.deployed_at:
                watch = apps[record.app_name] = fresh
            if watch.failed is None:
                actions = _watch_k8s(settings, record, watch)
                for action in actions:
                    done.append(action)
                    emit(action)
                count_actions(settings, actions)
            save_watch(settings, apps, history + done)
        return done


REPLICA_PENDING = "replica restart: "


def count_actions(settings: Settings, actions: list[Action]) -> None:
    """Each action counted for the metrics (kind and a bounded cause), and a restart's duration kept."""
    from tasks.metrics import counts

    path = settings.state.prometheus / "counts.json"
    for a in actions:
        kind = counts.action_kind(a.event)
        counts.bump(path, "watchdog_actions", {"app": a.app, "kind": kind, "cause": counts.cause_class(a.cause)})
        if a.event.endswith(".restarted") and a.duration_s is not None:
            counts.set_last(path, "restart_duration_seconds", {"app": a.app, "kind": kind}, a.duration_s)


def _watch_one(settings: Settings, record: DeploymentRecord, watch: AppWatch) -> list[Action]:
    def action(event: ActionKind, cause: str, **extra: Any) -> Action:
        return Action(
            event=event,
            app=record.app_name,
            model_uri=record.model_uri,
            version=record.model_version,
            cause=cause,
            **extra,
        )

    if watch.failed is not None:
        return []  # past its budget: left alone until a deploy or a reset
    if record.backend == "deepspeed_mpi":
        return _watch_deepspeed(settings, record, watch, action) + _front_held(settings, record, watch, action)
    return _watch_serve(settings, record, watch, action)


def _watch_deepspeed(
    settings: Settings, record: DeploymentRecord, watch: AppWatch, action: Callable[..., Action]
) -> list[Action]:
    from tasks.mpi.hosts import choose_hosts, clean_leftovers
    from tasks.mpi.launcher import stop_cluster
    from tasks.mpi.records import read_cluster, read_placement

    clean_leftovers(settings, record.app_name)  # ranks a partition kept out of reach of the last stop
    cause = check_deepspeed(settings, record) if watch.pending is None else f"finishing an interrupted {watch.pending}"
    if cause is None:
        return _report_degraded(watch, action, None)
    running = read_cluster(settings, record.app_name)
    try:
        placement = read_placement(settings, record.app_name)
        choose_hosts(placement, settings)
    except NotEnoughHosts as e:
        stop_cluster(settings, record.app_name)  # the survivors cannot go on alone; relaunched when hosts return
        done = _report_degraded(watch, action, str(e))
        for a in done:
            a.outcome = "; ".join(e.down.values())  # why each host is down (the cause stays the same per pass)
        return done
    except NodewiseError as e:
        return _report_degraded(watch, action, str(e))
    before = running.hosts if running is not None else placement.hosts
    after: list[str] = []

    def restart() -> tuple[float, str]:
        try:
            took, hosts = restart_deepspeed(settings, record)
            after.extend(hosts)
            return took, "every rank ready"
        except (DeployFailed, NodewiseError) as e:
            stop_cluster(settings, record.app_name)  # no half-started ranks left behind
            return 0.0, f"restart failed: {e}"

    done = _budgeted(settings, record, watch, action, "nodewise.cluster.restarted", cause, "all ranks", restart)
    if done.event == "nodewise.cluster.restarted":
        done.hosts_before, done.hosts_after = before, after or None
    return [done]


def _front_held(
    settings: Settings, record: DeploymentRecord, watch: AppWatch, action: Callable[..., Action]
) -> list[Action]:
    """What the group's front held, repeated and continued since the last pass (tasks/watchdog/front.py)."""
    from tasks.watchdog.front import front_report

    watch.front, fields = front_report(settings, record.app_name, watch.front)
    return [action("nodewise.front.held", **fields)] if fields else []


def _watch_serve(
    settings: Settings, record: DeploymentRecord, watch: AppWatch, action: Callable[..., Action]
) -> list[Action]:
    from tasks.watchdog import replicas as serve_watch

    why_not = serve_watch.connect_for(settings)
    if why_not is not None:
        return _report_degraded(watch, action, why_not)
    if watch.pending is not None and watch.pending.startswith(REPLICA_PENDING):  # a killed watchdog's restart
        name = watch.pending.removeprefix(REPLICA_PENDING)
        replica = serve_watch.ReplicaView(replica_id=name.rsplit("#", 1)[-1], actor_name=name, state="STOPPING")
        took, outcome = serve_watch.restart_replica(replica, settings)
        watch.pending = None
        cause = "finishing an interrupted replica restart"
        return [
            action(
                "nodewise.replica.restarted",
                cause,
                target=replica.describe(),
                duration_s=round(took, 2),
                outcome=outcome,
            )
        ]
    view = serve_watch.observe(record, settings.watchdog)
    if view is not None and record.spec.get("metrics", True):  # replicas come and go: their scrape targets follow
        from tasks.metrics.targets import write_serve_targets

        addresses = {r.replica_id: (r.vitals or {}).get("metrics_address") for r in view.replicas}
        write_serve_targets(settings, record, addresses)
    watch.running = None if view is None else sum(r.state == "RUNNING" for r in view.replicas)
    if view is None:
        return _report_degraded(
            watch, action, f"Serve has no app {record.app_name!r} (was Ray restarted?): run `nodewise deploy` again"
        )
    done = _replaced_by_serve(watch, view, action) + _report_degraded(watch, action, serve_watch.degraded_cause(view))
    sick = serve_watch.pick_sick(view, float(record.spec.get("max_error_rate", 0.5)), settings.watchdog)
    if sick is not None:
        replica, cause = sick

        def restart() -> tuple[float, str]:
            return serve_watch.restart_replica(replica, settings)

        pending = REPLICA_PENDING + replica.actor_name
        target = replica.describe()
        watch.restarted = [*watch.restarted[-9:], replica.replica_id]  # its replacement is not Serve's own
        done.append(
            _budgeted(settings, record, watch, action, "nodewise.replica.restarted", cause, target, restart, pending)
        )
    return done


def _replaced_by_serve(watch: AppWatch, view: Any, action: Callable[..., Action]) -> list[Action]:
    """Replicas that left since the last pass while the app kept its size: Serve replaced them (a
    replica that died: its process killed, or its node lost). Counted, never acted on."""
    seen = [r.replica_id for r in view.replicas]
    gone = [r for r in watch.replicas if r not in seen and r not in watch.restarted]
    shrunk = view.target < len(watch.replicas)  # a scale-down removes replicas on purpose
    watch.replicas = seen
    if shrunk:
        return []
    return [
        action("nodewise.replica.replaced", "the replica exited; Serve started another", target=f"replica {r}")
        for r in gone
    ]


def _watch_k8s(settings: Settings, record: DeploymentRecord, watch: AppWatch) -> list[Action]:
    from kubernetes.client.exceptions import ApiException

    from tasks.k8s import apply as k8s_apply
    from tasks.k8s import watch as k8s_watch
    from tasks.kubeapi import api_client

    def action(event: ActionKind, cause: str, **extra: Any) -> Action:
        fields = {"app": record.app_name, "model_uri": record.model_uri, "version": record.model_version}
        return Action(event=event, cause=cause, **fields, **extra)

    main = k8s_watch.workload(record.spec["objects"])
    namespace, name = main["metadata"]["namespace"], main["metadata"]["name"]
    watch.pending = None  # deleting pods is idempotent: a killed pass's action is simply judged again
    try:
        api = api_client()
        pods = k8s_watch.list_pods(api, namespace, name)
    except (NodewiseError, ApiException) as e:
        return _report_degraded(watch, action, f"the Kubernetes API did not answer: {str(e).splitlines()[0]}")
    pod, cause, degraded = k8s_watch.diagnose(main["kind"], pods)
    done = _report_degraded(watch, action, degraded)
    if pod is None or cause is None:
        return done
    if main["kind"] == "RayService":  # one replica's pod: the others keep serving

        def restart() -> tuple[float, str]:
            started = time.monotonic()
            outcome = k8s_apply.restart_pod(api, namespace, pod["metadata"]["name"])
            return time.monotonic() - started, outcome

        event, target = "nodewise.replica.restarted", f"pod {pod['metadata']['name']}"
    else:  # a rank group: every rank together

        def restart() -> tuple[float, str]:
            started = time.monotonic()
            outcome = "; ".join(k8s_apply.restart_group(api, main))
            return time.monotonic() - started, outcome

        event, target = "nodewise.cluster.restarted", f"all ranks of {main['kind']} {namespace}/{name}"
    done.append(_budgeted(settings, record, watch, action, event, cause, target, restart, f"group restart: {name}"))  # type: ignore[arg-type]
    return done


def _report_degraded(watch: AppWatch, action: Callable[..., Action], cause: str | None) -> list[Action]:
    """A degradation is reported when it starts or changes, and its end once."""
    if cause == watch.degraded:
        return []
    before, watch.degraded = watch.degraded, cause
    if cause is None:
        return [action("nodewise.deployment.recovered", f"was: {before}", target="app")]
    return [action("nodewise.deployment.degraded", cause, target="app")]


def _budgeted(
    settings: Settings,
    record: DeploymentRecord,
    watch: AppWatch,
    action: Callable[..., Action],
    event: ActionKind,
    cause: str,
    target: str,
    restart: Callable[[], tuple[float, str]],
    pending: str = "cluster restart",
) -> Action:
    """Run ``restart`` if the deployment's budget allows it; else say why not (or mark it failed)."""
    verdict, wait_s = budget(watch.restarts, time.time(), settings.watchdog)
    if verdict == "exhausted":
        wd = settings.watchdog
        watch.failed = f"{cause} after {wd.max_restarts} restarts in {wd.window_s:.0f} s"
        return action(
            "nodewise.deployment.failed", watch.failed, target=target, outcome="left alone until a deploy or a reset"
        )
    if verdict == "wait":
        return action(
            "nodewise.deployment.backoff", cause, target=target, outcome=f"next restart allowed in {wait_s:.0f} s"
        )
    watch.pending = pending
    watch.restarts.append(time.time())
    _save_one(settings, {record.app_name: watch})
    try:
        took, outcome = restart()
    finally:
        watch.pending = None
    return action(event, cause, target=target, duration_s=round(took, 2) if took else None, outcome=outcome)


def _save_one(settings: Settings, changed: dict[str, AppWatch]) -> None:
    """Persist a pending restart before starting it, so a killed watchdog's successor finishes it."""
    apps, history = load_watch(settings)
    apps.update(changed)
    save_watch(settings, apps, history)


def last_actions(settings: Settings, count: int = 5) -> list[Action]:
    return load_watch(settings)[1][-count:]
