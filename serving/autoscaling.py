"""nodewise's autoscaling policy for Ray Serve (Serve's custom policy hook), and what replicas report to it.

Serve calls ``scale_on_load`` on its controller about every 0.1 s with an ``AutoscalingContext``;
Serve's own wrapper then applies ``min_replicas``/``max_replicas`` and the upscale and downscale
delays, so the policy only says how many replicas the load asks for. Every replica reports, through
``record_autoscaling_stats`` (``ModelServer``), samples of:

- ``IN_FLIGHT``: requests in the replica (a scoring model's load);
- ``WAITING``, ``BUDGET_USED``, ``RUNNING``: a batching LLM engine's sequences waiting with no room
  (its batch is full or the first in line does not fit its token budget; a sequence that only
  waits for the next step to admit it is not counted), the share of its token budget that
  running sequences hold (0..1), and its running sequences.

Two rules, one per kind of replica:

- **Requests** (a scoring model): ``load / target_ongoing_requests`` replicas, where the load is the
  larger of the replicas' latest samples and their mean over the look-back window. The latest
  sample sees a step at once (Serve's own policy only sees the look-back mean rise, about half
  the window later); the mean keeps a short dip from shrinking the count. A step to C requests
  asks for ``ceil(C / target)`` replicas, not more: no overshoot. A short spike is seen in one
  sample, and the upscale delay (longer than the sampling interval) wants it in two.
- **Engine** (an LLM replica batches dozens of sequences, so requests in flight say nothing of
  its load): one more replica while sequences *wait* with no room (every replica's batch or token
  budget is full; the larger of the latest sample and the look-back's mean, since a queue of
  sequences that finish together comes and goes within seconds); one fewer when nothing waits
  and the tokens in use fit the remaining replicas at half their budget; else as many as now. A
  replica with budget left never asks for another.

The functions here run on Serve's controller, which unpickles them by value (Serve registers this
module with cloudpickle): they import nothing from nodewise.
"""

from __future__ import annotations

import math
from typing import Any

IN_FLIGHT = "nodewise_in_flight"
WAITING = "nodewise_waiting"
BUDGET_USED = "nodewise_budget_used"
RUNNING = "nodewise_running"

POLICY = "serving.autoscaling:scale_on_load"  # Serve's import path of the policy (a config file names it)
DOWNSCALE_FILL = 0.5  # an engine replica goes when the others would hold its tokens at this share of budget


def scale_on_load(ctx: Any) -> tuple[float, dict[str, Any]]:
    """Replicas the load asks for (Serve applies the bounds and delays), and what it saw (Serve keeps
    it as the policy state; ``explain`` words it)."""
    current = ctx.current_num_replicas
    if current == 0:  # Serve's cold-start path has already answered a request waiting for a replica
        return ctx.target_num_replicas, {}
    raw = ctx.raw_metrics or {}
    if WAITING in raw:
        return engine_replicas(current, raw)
    target = ctx.config.get_target_ongoing_requests()
    if IN_FLIGHT in raw:
        latest, mean = _latest_and_mean(raw[IN_FLIGHT])
        load = max(latest, mean)
    else:  # replicas that report nothing (yet): Serve's own count, averaged over the look-back
        load = ctx.total_num_requests
    return load / target, {"rule": "requests", "load": round(load, 2), "target": target}


def engine_replicas(current: int, raw: dict[str, dict[Any, list[Any]]]) -> tuple[float, dict[str, Any]]:
    """The engine rule (module docstring) on the replicas' raw samples."""
    latest, mean = _latest_and_mean(raw[WAITING])
    # Sequences of one length finish together, and what waited is admitted at once: the queue comes
    # and goes within a look-back, so its mean counts as much as its latest sample.
    waiting = max(latest, mean)
    used, _ = _latest_and_mean(raw.get(BUDGET_USED, {}))  # summed over replicas: budgets' worth in use
    seen = {"rule": "engine", "waiting": round(waiting, 2), "budget_used": round(used / max(current, 1), 3)}
    if waiting >= 1:
        return current + 1, seen
    if current > 1 and used <= (current - 1) * DOWNSCALE_FILL:
        return current - 1, seen
    return current, seen


def _latest_and_mean(series_by_replica: dict[Any, list[Any]]) -> tuple[float, float]:
    """Summed over replicas: each one's latest sample, and each one's mean over its samples."""
    latest = mean = 0.0
    for series in series_by_replica.values():
        if series:
            latest += max(series, key=lambda s: s.timestamp).value
            mean += sum(s.value for s in series) / len(series)
    return latest, mean


def explain(seen: dict[str, Any], replicas: int, floor: int, ceiling: int) -> str:
    """What the policy sees (its state, or the same figures read live by ``nodewise status``), the
    replicas it asks for, and what bounds that, in words."""
    if seen.get("rule") == "engine":
        used = seen["budget_used"]
        wanted = replicas + 1 if seen["waiting"] >= 1 else replicas
        if seen["waiting"] < 1 and replicas > 1 and used * replicas <= (replicas - 1) * DOWNSCALE_FILL:
            wanted = replicas - 1
        text = f"engine: {seen['waiting']:g} sequence(s) waiting, {used:.0%} of the token budget in use"
    else:
        wanted = math.ceil(seen["load"] / seen["target"])
        text = f"{seen['load']:g} request(s) in flight, target {seen['target']:g} a replica"
    bounded = min(max(wanted, floor, 1 if replicas else 0), ceiling)
    if wanted > ceiling:
        return f"{text}: wants {wanted}, capped at the ceiling of {ceiling}"
    return f"{text}: wants {bounded}"
