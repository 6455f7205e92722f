"""The watchdog: check every deployment, restart what is sick within a budget, say what it did.

One loop over every record (``deployments.json`` and ``k8s_deployments.json``): each is checked by
its backend's ``watch`` (tasks/backend.py; Ray Serve replica by replica in tasks/rayserve/watch.py,
a DeepSpeed group whole in tasks/mpi/watch.py, a workload's pods in tasks/k8s/watch.py), given a
``WatchPass`` that keeps the bookkeeping the same for all: the budget, degradations reported once,
scrape targets. A hung, failing or leaking Ray Serve replica is restarted alone while the others
keep serving; a sick DeepSpeed job is restarted whole, because the survivors of a lost rank cannot
go on alone.

Restarts are budgeted per deployment: at most ``max_restarts`` per ``window_s``, with a backoff
that doubles after each; past the budget the deployment is marked failed and left alone until a
deploy or ``reset`` clears it. State lives in ``<state>/watchdog.json``; one watchdog acts at a
time (a lock file), and a restart that a killed watchdog left half-done is finished by the next.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from nodewise.core.errors import Busy, NotDeployed
from nodewise.core.settings import Settings, WatchdogSettings
from nodewise.core.state import read_json, try_lock, write_json
from tasks.backend import Action, ActionKind, AppWatch, Restart
from tasks.backends import backend_for
from tasks.records import DeploymentRecord, load_records

KEEP_ACTIONS = 50


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
        records = [*load_records(settings.state.records).values(), *load_records(settings.state.k8s_records).values()]
        for record in records:  # the k8s ones: what `render --apply` put on Kubernetes
            fresh = AppWatch(version=record.model_version, deployed_at=record.deployed_at)
            watch = apps.setdefault(record.app_name, fresh)
            if watch.deployed_at != record.deployed_at:  # a deploy since: a fresh budget
                watch = apps[record.app_name] = fresh
            if watch.failed is None:  # else past its budget: left alone until a deploy or a reset
                actions = backend_for(record.backend).watch(settings, record, _Pass(settings, record, watch))
                for action in actions:
                    done.append(action)
                    emit(action)
                count_actions(settings, actions)
            save_watch(settings, apps, history + done)  # after each deployment: a kill loses little
        return done


def count_actions(settings: Settings, actions: list[Action]) -> None:
    """Each action counted for the metrics (kind and a bounded cause), and a restart's duration kept."""
    from tasks.metrics import counts

    path = settings.state.prometheus / "counts.json"
    for a in actions:
        kind = counts.action_kind(a.event)
        counts.bump(path, "watchdog_actions", {"app": a.app, "kind": kind, "cause": counts.cause_class(a.cause)})
        if a.event.endswith(".restarted") and a.duration_s is not None:
            counts.set_last(path, "restart_duration_seconds", {"app": a.app, "kind": kind}, a.duration_s)


class _Pass:
    """The engine's side of one backend check (tasks/backend.py's ``WatchPass``)."""

    def __init__(self, settings: Settings, record: DeploymentRecord, watch: AppWatch) -> None:
        self.settings, self.record, self.watch = settings, record, watch

    def action(self, event: ActionKind, cause: str, **extra: Any) -> Action:
        r = self.record
        return Action(event=event, app=r.app_name, model_uri=r.model_uri, version=r.model_version, cause=cause, **extra)

    def degraded(self, cause: str | None) -> list[Action]:
        return _report_degraded(self.watch, self.action, cause)

    def budgeted(
        self, event: ActionKind, cause: str, target: str, restart: Restart, pending: str = "cluster restart"
    ) -> Action:
        return _budgeted(self.settings, self.record, self.watch, self.action, event, cause, target, restart, pending)

    def scrape_targets(self, targets: dict[str | None, str | None]) -> None:
        from tasks.metrics.targets import write_targets

        write_targets(self.settings, self.record, targets)


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
