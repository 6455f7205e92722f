"""Rollouts without a cluster: agreement of two answers, a replica's stats, the decision rules,
the rules a model's tags set, and prefect.yaml's two rollout deployments."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

from nodewise.core.errors import InvalidServeOverride
from nodewise.core.settings import RolloutSettings
from serving.rollout import RolloutConfig, RolloutStats, agreement
from tasks.rollout.policy import Rollout, Summary, decide, summarize, tags_for
from tasks.rollout.store import rules_for

from .factories import resolved_model


def config(**fields: object) -> RolloutConfig:
    values: dict = {"mode": "shadow", "share": 1.0, "challenger_app": "m--challenger", "challenger_version": "2"}
    return RolloutConfig(**{**values, "epoch": "e-0", **fields})


def rollout(mode: str = "shadow", shares: tuple[float, ...] = (1.0,), step: int = 0, **rules: object) -> Rollout:
    return Rollout(
        model_name="m",
        app_name="m",
        challenger_app="m--challenger",
        champion_version="1",
        challenger_version="2",
        mode=mode,
        shares=list(shares),
        step=step,
        rules=RolloutSettings(min_requests=10, **rules),
    )


def summary(**fields: object) -> Summary:
    values: dict = {"requests": 100, "challenger_calls": 100, "champion_p99_ms": 10.0, "challenger_p99_ms": 11.0}
    return Summary(**{**values, **fields})


# -- agreement -------------------------------------------------------------------------------------
def test_agreement_per_row_for_each_comparison() -> None:
    a = [[0.1, 0.9], [0.8, 0.2], [0.5, 0.6]]
    close = [[0.1, 0.9], [0.8, 0.2], [0.5, 0.6000001]]
    assert agreement(a, close, config()) == (3, 3)
    assert agreement(a, [[0.1, 0.9], [0.2, 0.8], [0.5, 0.6]], config()) == (2, 3)
    # the same classes with other scores: class agrees where allclose does not
    other = [[0.3, 0.7], [0.6, 0.4], [0.1, 0.9]]
    assert agreement(a, other, config(compare="class")) == (3, 3)
    assert agreement(a, other, config()) == (0, 3)
    assert agreement(a, other, config(compare="distance", max_distance=0.4)) == (3, 3)
    assert agreement(a, other, config(compare="distance", max_distance=0.05)) == (0, 3)
    assert agreement(["cat", "dog"], ["cat", "cow"], config()) == (1, 2)  # labels: equal or not
    assert agreement([1, 0, 1], [[0.2, 0.8], [0.9, 0.1], [0.7, 0.3]], config(compare="class")) == (2, 3)
    assert agreement([[1.0, 2.0]], [[1.0, 2.0, 3.0]], config()) == (0, 1)  # another shape: no row agrees


def test_a_replica_counts_what_it_sees_of_one_epoch() -> None:
    stats = RolloutStats(config(share=0.25))
    picks = sum(stats.pick_challenger() for _ in range(4000))
    assert 800 < picks < 1200
    stats.champion_done(0.002, ok=True)
    stats.champion_done(0.004, ok=False)
    stats.challenger_done({"ok": True, "status": 200, "body": b"", "seconds": 0.003})
    stats.challenger_done({"ok": False, "status": 500, "body": b"{}", "detail": "RuntimeError: bug", "seconds": 0.0})
    stats.compare(json.dumps({"predictions": [1, 2]}).encode(), json.dumps({"predictions": [1, 3]}).encode())
    stats.compare(b"{", json.dumps({"predictions": [1]}).encode())  # not comparable: counted as disagreeing
    snap = stats.snapshot()
    assert (snap["requests"], snap["champion_errors"], snap["challenger_calls"], snap["challenger_errors"]) == (
        2,
        1,
        2,
        1,
    )
    assert (snap["rows_agreeing"], snap["rows_compared"]) == (1, 3)
    assert snap["errors"] == ["500: RuntimeError: bug"]
    assert snap["champion_latency_s"] == [0.002]
    assert snap["challenger_latency_s"] == [0.003]
    assert len(snap["disagreements"]) == 2


def test_summarize_adds_replicas_up_and_leaves_out_other_epochs() -> None:
    a = {"epoch": "e-1", "requests": 10, "challenger_calls": 10, "challenger_errors": 1, "rows_compared": 10}
    a |= {"rows_agreeing": 9, "champion_latency_s": [0.001] * 10, "challenger_latency_s": [0.002] * 10}
    b = {**a, "challenger_errors": 0, "rows_agreeing": 10}
    old = {**a, "epoch": "e-0", "challenger_calls": 1000}
    total = summarize([a, b, old, None], "e-1")  # type: ignore[list-item]
    assert (total.replicas, total.challenger_calls, total.challenger_errors) == (2, 20, 1)
    assert total.agreement == 19 / 20
    assert total.error_rate == 1 / 20
    assert total.champion_p99_ms == pytest.approx(1.0)
    assert total.challenger_p99_ms == pytest.approx(2.0)
    assert total.p99_ratio == pytest.approx(2.0)


# -- the decision ----------------------------------------------------------------------------------
def test_it_waits_for_enough_calls_then_checks_each_rule() -> None:
    assert decide(rollout(), summary(challenger_calls=9)).action == "wait"
    bad = decide(rollout(), summary(challenger_errors=5, errors=["500: RuntimeError: bug"]))
    assert (bad.action, bad.reason) == (
        "rollback",
        "error rate 5.0% > 1.0% over 100 calls; e.g. 500: RuntimeError: bug",
    )
    slow = decide(rollout(), summary(challenger_p99_ms=25.0))
    assert slow.action == "rollback"
    assert slow.reason.startswith("p99 latency 25.0 ms is 2.50x the champion's 10.0 ms > 2.0x")
    unlike = decide(rollout(), summary(rows_compared=100, rows_agreeing=90))
    assert unlike.action == "rollback"
    assert unlike.reason.startswith("agreement 90.0% < 99.0% (allclose)")
    good = decide(rollout(), summary(rows_compared=100, rows_agreeing=100))
    assert good.action == "promote"
    assert "agreement 100.0%" in good.reason


def test_a_canary_advances_through_its_steps_then_is_promoted() -> None:
    steps = (0.05, 0.25, 0.5)
    assert decide(rollout("canary", steps, 0), summary()).reason.endswith("at 5%: on to 25%")
    assert decide(rollout("canary", steps, 1), summary()).action == "advance"
    assert decide(rollout("canary", steps, 2), summary()).action == "promote"
    # a canary's rows are not compared: agreement is not judged
    assert decide(rollout("canary", (0.5,)), summary(rows_compared=0)).action == "promote"
    # the thresholds are the model's own
    assert decide(rollout(max_error_rate=0.1), summary(challenger_errors=5)).action == "promote"


def test_the_rollout_config_follows_the_step_and_tags_record_the_outcome() -> None:
    r = rollout("canary", (0.05, 0.5), 1)
    cfg = r.config()
    assert (cfg.share, cfg.mode, cfg.epoch) == (0.5, "canary", f"{r.epoch}-1")
    tags = tags_for(r, "rolled_back", summary(challenger_errors=3), "error rate 3.0% > 1.0%")
    assert tags["nodewise.rollout.status"] == "rolled_back"
    assert tags["nodewise.rollout.reason"] == "error rate 3.0% > 1.0%"
    assert (tags["nodewise.rollout.error_rate"], tags["nodewise.rollout.share_used"]) == ("0.0300", "0.5")


# -- a model's rules, from its tags ----------------------------------------------------------------
def model(tags: dict[str, str] | None = None, model_tags: dict[str, str] | None = None):
    return resolved_model(name="m", version="2", pinned_uri="models:/m/2", tags=tags or {}, model_tags=model_tags or {})


def test_tags_set_the_mode_and_the_steps_the_versions_tags_win() -> None:
    rules = rules_for(
        model({"nodewise.rollout.share": "0.05, 0.25,0.5"}, {"nodewise.rollout.mode": "canary"}), RolloutSettings()
    )
    assert (rules.mode, rules.share) == ("canary", [0.05, 0.25, 0.5])
    rules = rules_for(
        model({"nodewise.rollout.min_agreement": "0.9"}, {"nodewise.rollout.min_agreement": "0.5"}), RolloutSettings()
    )
    assert rules.min_agreement == 0.9
    # what nodewise wrote back on a version earlier is not a setting to refuse
    assert rules_for(model({"nodewise.rollout.status": "rolled_back"}), RolloutSettings()) == RolloutSettings()


def test_bad_tags_are_refused_naming_the_tag_and_the_fix() -> None:
    with pytest.raises(InvalidServeOverride, match=r"model version tag nodewise.rollout.share='1.5'.*fix or delete"):
        rules_for(model({"nodewise.rollout.share": "1.5"}), RolloutSettings())
    with pytest.raises(InvalidServeOverride, match=r"'nodewise.rollout.mood' .* not a setting"):
        rules_for(model({"nodewise.rollout.mood": "canary"}), RolloutSettings())
    with pytest.raises(InvalidServeOverride, match=r"shadow mode takes one share"):
        rules_for(model({"nodewise.rollout.share": "0.1,0.5"}), RolloutSettings())


# -- prefect.yaml ----------------------------------------------------------------------------------
def test_prefect_yaml_starts_a_rollout_on_the_challenger_alias_and_decides_on_a_schedule() -> None:
    import yaml

    from flows.rollout import decide_rollouts, start_rollout

    data = yaml.safe_load((Path(__file__).resolve().parents[2] / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in data["deployments"]}
    start = by_name["start-rollout"]
    assert start["entrypoint"] == "flows/rollout.py:start_rollout"
    [trigger] = start["triggers"]
    assert trigger["expect"] == ["nodewise.model.promoted"]
    assert trigger["match"]["nodewise.alias"] == RolloutSettings().challenger_alias
    assert set(trigger["parameters"]) == set(inspect.signature(start_rollout.fn).parameters)
    decide_ = by_name["decide-rollouts"]
    assert decide_["entrypoint"] == "flows/rollout.py:decide_rollouts"
    assert decide_["schedules"] == [{"interval": RolloutSettings().every_s}]
    assert decide_["concurrency_limit"]["limit"] == 1
    assert set(inspect.signature(decide_rollouts.fn).parameters) == {"model_name"}


# -- a DeepSpeed champion: the numbers, then the refusal -------------------------------------------
def test_a_deepspeed_champion_is_refused_with_what_two_groups_would_take(tmp_path: Path) -> None:
    from flows.rollout import _refuse_multi_node
    from nodewise.core.errors import DoesNotFit, UnsupportedModel
    from nodewise.core.settings import Settings
    from tasks.records import DeploymentRecord

    def inventory(nodes: int) -> str:
        node = "  - {{name: n{i}, cpus: 8, host_memory: 64GiB, gpus: [{{name: L4, memory: 24GiB, count: 1}}]}}"
        path = tmp_path / f"{nodes}.yaml"
        path.write_text("nodes:\n" + "\n".join(node.format(i=i) for i in range(nodes)) + "\n")
        return str(path)

    record = DeploymentRecord(
        app_name="llm",
        model_name="llm",
        model_version="1",
        model_uri="models:/llm/1",
        backend="deepspeed_mpi",
        endpoint="http://h:8100",
        replicas=1,
        plan="",
        spec={"tp_size": 2},
    )
    settings = Settings(state_dir=tmp_path)
    with pytest.raises(DoesNotFit, match=r"has 3 node\(s\); the champion's group of 2 ranks takes 2.*add 1 node"):
        _refuse_multi_node("llm", "2", record, inventory(3), settings)
    with pytest.raises(UnsupportedModel, match=r"has 4 node\(s\).*could hold, but shadow and canary .* not built"):
        _refuse_multi_node("llm", "2", record, inventory(4), settings)
