"""nodewise's Serve autoscaling policy (serving/autoscaling.py), called as Serve's controller calls it:
with Ray's own AutoscalingContext and AutoscalingConfig, through Serve's wrapper that applies the
bounds and delays."""

from __future__ import annotations

from typing import Any

import pytest
from ray.serve._private.common import DeploymentID, ReplicaID, TimeStampedValue
from ray.serve.autoscaling_policy import _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from serving.autoscaling import BUDGET_USED, IN_FLIGHT, RUNNING, WAITING, explain, scale_on_load

DEPLOYMENT = DeploymentID(name="ModelServer", app_name="m")


def replica(i: int) -> ReplicaID:
    return ReplicaID(unique_id=f"r{i}", deployment_id=DEPLOYMENT)


def series(*values: float, end: float = 100.0, step: float = 2.4) -> list[TimeStampedValue]:
    """Samples ``step`` s apart, the last at ``end``."""
    return [TimeStampedValue(end - step * (len(values) - 1 - i), v) for i, v in enumerate(values)]


def context(
    current: int,
    raw: dict[str, dict[ReplicaID, list[TimeStampedValue]]] | None,
    *,
    total: float = 0.0,
    config: AutoscalingConfig | None = None,
    state: dict[str, Any] | None = None,
    now: float = 100.0,
) -> AutoscalingContext:
    config = config or AutoscalingConfig(min_replicas=1, max_replicas=2, target_ongoing_requests=4.0)
    return AutoscalingContext(
        deployment_id=DEPLOYMENT,
        deployment_name=DEPLOYMENT.name,
        app_name=DEPLOYMENT.app_name,
        current_num_replicas=current,
        target_num_replicas=current,
        running_replicas=[replica(i) for i in range(current)],
        total_num_requests=total,
        total_queued_requests=0.0,
        aggregated_metrics=None,
        raw_metrics=raw,
        capacity_adjusted_min_replicas=config.min_replicas,
        capacity_adjusted_max_replicas=config.max_replicas,
        policy_state=state or {},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=now,
        config=config,
    )


def test_a_step_is_seen_in_the_latest_sample_not_after_the_window_averages_it() -> None:
    # One replica, the window so far at 1 in flight, the latest sample 8: 8 / 4 = 2 replicas.
    raw = {IN_FLIGHT: {replica(0): series(1, 1, 1, 1, 8)}}
    desired, seen = scale_on_load(context(1, raw))
    assert desired == pytest.approx(2.0)
    assert seen == {"rule": "requests", "load": 8.0, "target": 4.0}
    # Serve's own rule on the same window: the mean (2.4) asks for 0.6 replicas, i.e. no change.
    assert sum((1, 1, 1, 1, 8)) / 5 / 4.0 < 1


def test_a_step_asks_for_what_it_needs_and_serves_delay_holds_it_back() -> None:
    raw = {IN_FLIGHT: {replica(0): series(16, 16), replica(1): series(16, 16)}}
    assert scale_on_load(context(2, raw))[0] == pytest.approx(8.0)  # 32 in flight / 4, no more
    wrapped = _apply_autoscaling_config(scale_on_load)  # as Serve's controller wraps a custom policy
    waiting = AutoscalingConfig(min_replicas=1, max_replicas=2, target_ongoing_requests=4.0, upscale_delay_s=60.0)
    assert wrapped(context(1, raw, config=waiting))[0] == 1  # the upscale delay has not passed
    now = AutoscalingConfig(min_replicas=1, max_replicas=2, target_ongoing_requests=4.0, upscale_delay_s=0.0)
    assert wrapped(context(1, raw, config=now))[0] == 8  # Serve's bounds then cap it at max_replicas


def test_a_dip_in_the_latest_sample_does_not_shrink_the_count() -> None:
    raw = {IN_FLIGHT: {replica(0): series(4, 4, 4, 0), replica(1): series(4, 4, 4, 0)}}
    desired, seen = scale_on_load(context(2, raw))
    assert seen["load"] == pytest.approx(6.0)  # the window's mean wins over the latest (0)
    assert desired == pytest.approx(1.5)


def test_replicas_that_report_nothing_yet_fall_back_to_serves_own_count() -> None:
    desired, seen = scale_on_load(context(1, None, total=12.0))
    assert desired == pytest.approx(3.0)
    assert seen["load"] == 12.0


def test_scale_from_zero_is_left_to_serves_cold_start() -> None:
    assert scale_on_load(context(0, {}))[0] == 0


def engine(waiting: list[float], used: list[float], running: list[float] | None = None) -> dict:
    running = running or [8.0] * len(waiting)
    return {
        WAITING: {replica(i): series(w) for i, w in enumerate(waiting)},
        BUDGET_USED: {replica(i): series(u) for i, u in enumerate(used)},
        RUNNING: {replica(i): series(r) for i, r in enumerate(running)},
        # an LLM replica also reports its HTTP requests: 16 in flight would ask for 4 replicas by requests
        IN_FLIGHT: {replica(i): series(16.0) for i in range(len(waiting))},
    }


def test_an_llm_replica_with_budget_left_does_not_ask_for_another() -> None:
    desired, seen = scale_on_load(context(1, engine(waiting=[0], used=[0.6])))
    assert desired == 1
    assert seen == {"rule": "engine", "waiting": 0.0, "budget_used": 0.6}


def test_llm_replicas_grow_by_one_while_sequences_wait() -> None:
    desired, seen = scale_on_load(context(2, engine(waiting=[3, 0], used=[1.0, 0.95])))
    assert desired == 3
    assert seen["waiting"] == 3.0


def test_llm_replicas_shrink_when_the_rest_would_hold_the_tokens_at_half_budget() -> None:
    assert scale_on_load(context(3, engine(waiting=[0, 0, 0], used=[0.3, 0.3, 0.3])))[0] == 2  # 0.9 <= 2 * 0.5
    assert scale_on_load(context(3, engine(waiting=[0, 0, 0], used=[0.5, 0.4, 0.3])))[0] == 3  # 1.2 > 1.0
    assert scale_on_load(context(1, engine(waiting=[0], used=[0.0])))[0] == 1  # the floor is Serve's


def test_explain_says_what_the_policy_saw_and_what_capped_it() -> None:
    seen = {"rule": "requests", "load": 31.5, "target": 4.0}
    assert explain(seen, replicas=2, floor=1, ceiling=2) == (
        "31.5 request(s) in flight, target 4 a replica: wants 8, capped at the ceiling of 2"
    )
    idle = {"rule": "requests", "load": 0.0, "target": 4.0}
    assert explain(idle, replicas=1, floor=1, ceiling=2) == "0 request(s) in flight, target 4 a replica: wants 1"
    busy = {"rule": "engine", "waiting": 0.0, "budget_used": 0.6}
    assert explain(busy, replicas=1, floor=1, ceiling=3) == (
        "engine: 0 sequence(s) waiting, 60% of the token budget in use: wants 1"
    )
    queued = {"rule": "engine", "waiting": 5.0, "budget_used": 1.0}
    assert explain(queued, replicas=3, floor=1, ceiling=3).endswith("wants 4, capped at the ceiling of 3")


def test_a_queue_that_comes_and_goes_counts_by_its_mean() -> None:
    """Sequences of one length finish together: the latest sample may catch an empty queue."""
    raw = engine(waiting=[0], used=[1.0])
    raw[WAITING] = {replica(0): series(16, 0, 16, 0, 12, 0)}
    desired, seen = scale_on_load(context(1, raw))
    assert desired == 2
    assert seen["waiting"] == round(44 / 6, 2)
