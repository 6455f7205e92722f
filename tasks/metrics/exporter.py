"""The control plane's metrics: an exporter that reads the state folder at every scrape.

The watchdog, rollouts and promotions run as short Prefect flow runs; what they know lives in the
state folder (``watchdog.json``, ``rollouts.json``, ``promotions.json``, ``prometheus/counts.json``,
``deployments.json``). This process (``nodewise exporter``, started by ``nodewise up``) answers
``/metrics`` on loopback from those files, so nothing depends on a flow run being alive when
Prometheus scrapes (the exporter pattern, as node_exporter reads /proc). Every ``refresh_s`` it also
rewrites the scrape targets that need no cluster call (tasks/metrics/targets.py).

A deployment's state: ``failed`` (the watchdog's budget ran out), ``degraded`` (the watchdog's last
word), ``scaled_to_zero`` (a Ray Serve app with ``min_replicas`` 0 and no replica running at the last
pass), ``down`` (its endpoint does not answer ``/ping`` within a second, or its mpirun exited), else
``serving``. A deployment on Kubernetes (``render --apply``) is as the watchdog last judged its pods.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from nodewise.core.settings import Settings
from nodewise.core.state import read_json
from serving.metrics import BY_NAME
from tasks.backends import backend_for
from tasks.metrics import counts
from tasks.records import DeploymentRecord, load_records

STATES = ("serving", "degraded", "scaled_to_zero", "failed", "down")
ROLLOUT_OUTCOMES = ("promoted", "rolled_back", "failed")
PING_TIMEOUT_S = 1.0


def _family(name: str, labels: list[tuple[dict[str, str], float]]) -> Metric:
    spec = BY_NAME[name]
    base = name.removesuffix("_total") if spec.kind == "counter" else name
    family = (CounterMetricFamily if spec.kind == "counter" else GaugeMetricFamily)(
        base, spec.help, labels=list(spec.labels)
    )
    for values, value in labels:
        family.add_metric([values.get(k, "") for k in spec.labels], value)
    return family


def deployment_state(settings: Settings, record: DeploymentRecord, watch: dict[str, Any]) -> str:
    """One of ``STATES`` (see the module's docstring)."""
    if watch.get("failed"):
        return "failed"
    if watch.get("degraded"):
        return "degraded"
    known = backend_for(record.backend).state(settings, record, watch)  # scaled to zero, down, or on Kubernetes
    if known is not None:
        return known
    try:
        answered = httpx.get(f"{record.endpoint.rstrip('/')}/ping", timeout=PING_TIMEOUT_S).status_code == 200
    except httpx.HTTPError:
        answered = False
    return "serving" if answered else "down"


def _with_zeros(
    counted: list[tuple[dict[str, str], float]], records: dict[str, DeploymentRecord]
) -> list[tuple[dict[str, str], float]]:
    """Every served model's rollout outcomes, at 0 until one happens: ``increase()`` in an alert
    sees a first rollback only where the series existed before it."""
    have = {(labels.get("model"), labels.get("outcome")) for labels, _ in counted}
    zeros = [
        ({"model": r.model_name, "outcome": outcome}, 0.0)
        for r in records.values()
        for outcome in ROLLOUT_OUTCOMES
        if (r.model_name, outcome) not in have
    ]
    return counted + zeros


class ControlPlaneCollector(Collector):
    """Everything of ``scope="control"`` in serving/metrics.py's schema, read afresh at each scrape."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        s = self.settings
        records = {**load_records(s.state.records), **load_records(s.state.k8s_records)}  # k8s: `render --apply`'s
        watch = read_json(s.state.watchdog).get("apps", {})
        states = {app: deployment_state(s, r, watch.get(app, {})) for app, r in records.items()}
        yield _family(
            "nodewise_deployment_state",
            [
                ({"app": app, "model": r.model_name, "backend": r.backend, "state": st}, float(states[app] == st))
                for app, r in records.items()
                for st in STATES
            ],
        )
        yield _family(
            "nodewise_deployments", [({"state": st}, float(sum(v == st for v in states.values()))) for st in STATES]
        )
        yield from self._budgets(records, watch)
        counted = counts.read(s.state.prometheus / "counts.json")
        yield _family("nodewise_watchdog_actions_total", counted.get("watchdog_actions", []))
        yield _family("nodewise_restart_duration_seconds", counted.get("restart_duration_seconds", []))
        yield _family("nodewise_rollouts_total", _with_zeros(counted.get("rollouts", []), records))
        yield from self._rollouts()
        yield _family("nodewise_promotion_duration_seconds", self._promotions())

    def _budgets(self, records: dict[str, DeploymentRecord], watch: dict[str, Any]) -> Iterator[Metric]:
        wd, now = self.settings.watchdog, time.time()
        remaining, allowed = [], []
        for app in records:
            w = watch.get(app, {})
            recent = [t for t in w.get("restarts", []) if now - t < wd.window_s]
            left = 0 if w.get("failed") else max(0, wd.max_restarts - len(recent))
            remaining.append(({"app": app}, float(left)))
            allowed.append(({"app": app}, float(wd.max_restarts)))
        yield _family("nodewise_restart_budget_remaining", remaining)
        yield _family("nodewise_restart_budget", allowed)

    def _rollouts(self) -> Iterator[Metric]:
        shares, calls, errors, agreement = [], [], [], []
        for name, raw in read_json(self.settings.state.rollouts).items():
            version = str(raw.get("challenger_version", ""))
            labels = {"model": name, "version": version}
            step, all_shares = int(raw.get("step", 0)), raw.get("shares") or [0.0]
            shares.append(
                ({**labels, "mode": str(raw.get("mode", ""))}, float(all_shares[min(step, len(all_shares) - 1)]))
            )
            summary = (raw.get("last") or {}).get("summary") or {}
            made = float(summary.get("challenger_calls", 0))
            calls.append((labels, made))
            errors.append((labels, float(summary.get("challenger_errors", 0)) / made if made else 0.0))
            compared = summary.get("rows_compared", 0)
            if compared:
                agreement.append((labels, float(summary.get("rows_agreeing", 0)) / compared))
        yield _family("nodewise_rollout_share", shares)
        yield _family("nodewise_rollout_calls", calls)
        yield _family("nodewise_rollout_error_ratio", errors)
        yield _family("nodewise_rollout_agreement_ratio", agreement)

    def _promotions(self) -> list[tuple[dict[str, str], float]]:
        last: dict[str, float] = {}
        for entry in read_json(self.settings.state.promotions).get("history", []):
            if entry.get("duration_s") is not None:
                last[str(entry.get("model"))] = float(entry["duration_s"])
        return [({"model": model}, seconds) for model, seconds in sorted(last.items())]

    def describe(self) -> Iterator[Metric]:
        return iter(())


def registry_for(settings: Settings) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ControlPlaneCollector(settings))
    return registry


def run(settings: Settings, stop: Any = None) -> None:
    """Serve ``/metrics`` on ``settings.metrics.exporter_host:exporter_port`` and keep the scrape
    targets current until ``stop`` (a ``threading.Event``) is set, or forever."""
    import threading

    from prometheus_client import start_http_server

    from tasks.metrics.targets import refresh, write_control_target

    m = settings.metrics
    server, thread = start_http_server(m.exporter_port, addr=m.exporter_host, registry=registry_for(settings))
    host = f"[{m.exporter_host}]" if ":" in m.exporter_host else m.exporter_host
    write_control_target(settings, f"{host}:{server.server_port}")
    stop = stop or threading.Event()
    try:
        while not stop.is_set():
            refresh(settings)
            stop.wait(m.refresh_s)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
