"""The watchdog's restart budget, and prefect.yaml as Prefect reads it."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodewise.core.settings import WatchdogSettings
from tasks.watchdog.engine import budget

WD = WatchdogSettings(max_restarts=3, window_s=600, backoff_s=10, backoff_max_s=25)


@pytest.mark.parametrize(
    ("restarts", "now", "expected"),
    [
        ([], 1000.0, ("allow", 0.0)),
        ([995.0], 1000.0, ("wait", 5.0)),  # 10 s after the first restart
        ([990.0], 1000.0, ("allow", 0.0)),
        ([900.0, 985.0], 1000.0, ("wait", 5.0)),  # 20 s after the second
        ([900.0, 980.0], 1000.0, ("allow", 0.0)),
        ([800.0, 900.0, 990.0], 1000.0, ("exhausted", 0.0)),  # three in the window
        ([100.0, 200.0, 990.0], 1000.0, ("allow", 0.0)),  # two of them fell out of the window
    ],
)
def test_restarts_back_off_then_stop_at_the_budget(restarts: list[float], now: float, expected: tuple) -> None:
    verdict, wait = budget(restarts, now, WD)
    assert (verdict, round(wait, 3)) == expected


def test_backoff_is_capped() -> None:
    wd = WatchdogSettings(max_restarts=10, backoff_s=10, backoff_max_s=25)
    assert budget([1000.0, 1001.0, 1002.0], 1002.0, wd) == ("wait", 25.0)  # 10 * 2**2 = 40, capped at 25


def test_prefect_yaml_is_valid_for_prefect() -> None:
    import yaml
    from prefect.cli.deploy._models import PrefectYamlModel

    data = yaml.safe_load((Path(__file__).resolve().parents[2] / "prefect.yaml").read_text())
    model = PrefectYamlModel.model_validate(data)
    watch = next(d for d in model.deployments if d.name == "watch-deployments")
    assert watch.entrypoint == "flows/watchdog.py:watch_deployments"
    assert watch.schedules[0].interval.total_seconds() == 30
    assert watch.concurrency_limit.limit == 1
    from prefect.events import DeploymentEventTrigger

    raw = next(d for d in data["deployments"] if d["name"] == "watch-deployments")
    [trigger] = [DeploymentEventTrigger.model_validate(t) for t in raw["triggers"]]
    assert trigger.expect == {"nodewise.cluster.exited"}  # what tasks/mpi/supervise.py posts
    assert trigger.match.model_dump()["prefect.resource.id"] == "nodewise.deployment.*"


def test_resetting_an_unknown_deployment_names_what_is_watched(tmp_path: Path) -> None:
    from nodewise.core.errors import NodewiseError
    from nodewise.core.settings import Settings
    from tasks.watchdog.engine import AppWatch, reset, save_watch

    settings = Settings(state_dir=tmp_path)
    with pytest.raises(NodewiseError, match="the watchdog has nothing on 'nope'; watched: none"):
        reset(settings, "nope")
    save_watch(settings, {"llm": AppWatch(restarts=[1.0], failed="dead")}, [])
    with pytest.raises(NodewiseError, match="watched: llm"):
        reset(settings, "nope")
    assert "restart budget reset" in reset(settings, "llm")
