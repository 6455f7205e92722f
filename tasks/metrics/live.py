"""Live figures for ``nodewise status``, from the same metrics Prometheus scrapes.

Each deployment's scrape targets (tasks/metrics/targets.py) are read twice, ``window_s`` apart, all
at once: the request rate and the p99 latency are those of the window (inference routes only: the
health checks ``status`` itself makes are not traffic). With no request in the window, the p99 is
the one since the process started, and says so. Restarts are the watchdog's (restarted or replaced
replicas, restarted groups), from the control plane's counters.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from nodewise.core.settings import Settings
from tasks.metrics import counts
from tasks.metrics.targets import read_targets

INFERENCE = frozenset({"/invocations", "/generate", "/v1/completions", "/v1/chat/completions"})
RESTARTS = frozenset({"replica_restarted", "replica_replaced", "cluster_restarted"})


# Gauges summed over a deployment's targets: the load its autoscaling policy reads (serving/autoscaling.py)
LOAD = {
    "nodewise_requests_in_flight": "in_flight",
    "nodewise_sequences_waiting": "waiting",
    "nodewise_sequences_blocked": "blocked",
    "nodewise_tokens_in_flight": "tokens_in_flight",
    "nodewise_token_budget": "token_budget",
}


def _scrape(address: str) -> tuple[float, dict[float, float], dict[str, float]] | None:
    """(inference requests answered, latency bucket counts by upper bound, LOAD gauges) of one target."""
    try:
        text = httpx.get(f"http://{address}/metrics", timeout=2.0).text
    except httpx.HTTPError:
        return None
    requests, buckets, load = 0.0, {}, {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in LOAD:
                load[LOAD[s.name]] = load.get(LOAD[s.name], 0.0) + s.value
                continue
            if s.labels.get("route") not in INFERENCE:
                continue
            if s.name == "nodewise_requests_total":
                requests += s.value
            elif s.name == "nodewise_request_duration_seconds_bucket":
                bound = float(s.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + s.value
    return requests, buckets, load


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """``q``'s value from cumulative bucket counts, interpolated as Prometheus' histogram_quantile does."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank, lower, below = q * buckets[bounds[-1]], 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if math.isinf(bound):
                return lower  # past the last finite bucket: its bound is what can be said
            return lower + (bound - lower) * (rank - below) / max(buckets[bound] - below, 1e-12)
        lower, below = bound, buckets[bound]
    return None


def live_figures(settings: Settings, window_s: float = 1.0) -> dict[str, dict[str, Any]]:
    """app -> {"requests_per_s", "p99_s", "p99_over", "restarts", "targets", "answering", "load"}."""
    files = read_targets(settings)
    by_app: dict[str, list[str]] = {}
    for name, groups in files.items():
        if name.startswith("serving/"):
            by_app[name.removeprefix("serving/").removesuffix(".json")] = [t for g in groups for t in g["targets"]]
    addresses = [a for targets in by_app.values() for a in targets]
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(addresses)))) as pool:
        first = dict(zip(addresses, pool.map(_scrape, addresses), strict=True))
        started = time.monotonic()
        time.sleep(window_s)
        second = dict(zip(addresses, pool.map(_scrape, addresses), strict=True))
        elapsed = time.monotonic() - started
    restarts: dict[str, float] = {}
    for labels, value in counts.read(settings.state.prometheus / "counts.json").get("watchdog_actions", []):
        if labels.get("kind") in RESTARTS:
            restarts[labels.get("app", "")] = restarts.get(labels.get("app", ""), 0.0) + value
    out = {}
    for app, targets in by_app.items():
        requests, window, total, load = 0.0, {}, {}, {}
        answering = 0
        for address in targets:
            a, b = first.get(address), second.get(address)
            if b is None:
                continue
            answering += 1
            for bound, n in b[1].items():
                total[bound] = total.get(bound, 0.0) + n
                window[bound] = window.get(bound, 0.0) + n - (a[1].get(bound, 0.0) if a else n)
            requests += b[0] - (a[0] if a else b[0])
            for name, value in b[2].items():
                load[name] = load.get(name, 0.0) + value
        in_window = requests > 0
        p99 = quantile(0.99, window if in_window else total)
        out[app] = {
            "requests_per_s": round(requests / elapsed, 2),
            "p99_s": None if p99 is None else round(p99, 4),
            "p99_over": f"the last {elapsed:.1f} s" if in_window else "since start",
            "restarts": int(restarts.get(app, 0)),
            "targets": len(targets),
            "answering": answering,
            "load": load,  # now, summed over the answering targets
        }
    return out
