"""Registry-driven rollouts on real Ray Serve, MLflow and Prefect (the test harness's API).

One champion (twice its input) serves through the module. Challengers are set with the
``challenger`` alias and started by the ``start-rollout`` flow; the ``decide-rollouts`` flow
judges them: a disagreeing one in shadow mode (clients see only the champion's answers) and one
that fails on some inputs in canary mode (clients never see its failures) are rolled back with
the reason on their tags; a like one in canary mode is answered for about its share, advances
and is promoted under a steady client with no request failed; a decision flow killed (SIGKILL)
half-way through a promotion is finished by the next run, aliases and tags consistent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from nodewise.core.settings import Settings
from nodewise.ops.status import deployment_status
from tasks.records import get_record
from tasks.rollout import store
from testkit import LoadClient, wait_until
from testkit.flows import decide_rollouts, deploy_model, start_rollout
from testkit.models import FailsOnLarge, TimesIt, register_pyfunc

from .conftest import module_settings

NAME = "rolled"
ROOT = Path(__file__).resolve().parents[2]
SMALL = json.dumps({"inputs": [[1.0, 2.0, 3.0]]}).encode()
LARGE = json.dumps({"inputs": [[50.0, 2.0, 3.0]]}).encode()


@pytest.fixture(scope="module")
def settings(prefect_harness: None) -> Iterator[Settings]:
    # small thresholds: a test sends tens of requests, not thousands; latency is not judged here
    # (two replicas on two shared cores are too noisy for a p99 ratio of a few milliseconds)
    rollout = {"min_requests": 20, "max_p99_ratio": 1000.0}
    yield from module_settings(rollout=rollout)


@pytest.fixture(scope="module")
def champion(settings: Settings) -> str:
    """The champion's endpoint: version 1 of ``rolled``, twice its input."""
    from mlflow import MlflowClient

    uri = register_pyfunc(TimesIt(2.0), NAME, str(settings.state.artifacts))
    MlflowClient().set_registered_model_alias(NAME, "champion", uri.rsplit("/", 1)[1])
    return deploy_model(uri, settings=settings).endpoint


def challenger(settings: Settings, model: object, **tags: str) -> str:
    """Register ``model`` as the next version, with ``nodewise.rollout.*`` tags; set the alias; start it."""
    from mlflow import MlflowClient

    version = register_pyfunc(model, NAME, str(settings.state.artifacts)).rsplit("/", 1)[1]  # type: ignore[arg-type]
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(NAME, version, f"nodewise.rollout.{key}", value)
    client.set_registered_model_alias(NAME, "challenger", version)
    start_rollout(NAME, settings=settings)
    return version


def send(endpoint: str, n: int, body: bytes = SMALL) -> Counter[str]:
    """``n`` requests; the answering versions (every answer must be a 200, twice the input)."""
    seen: Counter[str] = Counter()
    with httpx.Client(timeout=30) as http:
        for _ in range(n):
            r = http.post(f"{endpoint}/invocations", content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 200, r.text
            inputs = json.loads(body)["inputs"]
            assert r.json()["predictions"] == [[2 * v for v in inputs[0]]]
            seen[r.headers["x-nodewise-version"]] += 1
    return seen


def aliases(settings: Settings) -> dict[str, str]:
    from mlflow import MlflowClient

    return {k: str(v) for k, v in MlflowClient().get_registered_model(NAME).aliases.items()}


def tags_of(version: str) -> dict[str, str]:
    from mlflow import MlflowClient

    return MlflowClient().get_model_version(NAME, version).tags


def serve_apps() -> set[str]:
    from ray import serve

    return set(serve.status().applications)


def test_shadow_answers_with_the_champion_and_a_disagreeing_challenger_is_rolled_back(
    settings: Settings, champion: str
) -> None:
    v2 = challenger(settings, TimesIt(3.0))  # shadow (the default), every request copied
    assert "rolled--challenger" in serve_apps()
    assert send(champion, 30) == Counter({"1": 30})  # only the champion's answers
    rollout = store.get(settings.state.rollouts, NAME)
    assert rollout is not None
    assert rollout.mode == "shadow"
    [row] = deployment_status(settings)["deployments"]
    assert row["rollout"]["summary"] == f"version {v2} in shadow mode beside 1: 100% of requests"
    [outcome] = decide_rollouts(settings=settings)
    assert outcome == f"{NAME}: rolled back version {v2}"
    [row] = deployment_status(settings)["deployments"]
    assert "rollout" not in row
    assert row["last_rollout"].endswith(f"version {v2} rolled back: {tags_of(v2)['nodewise.rollout.reason']}")
    tags = tags_of(v2)
    assert tags["nodewise.rollout.status"] == "rolled_back"
    assert tags["nodewise.rollout.reason"].startswith("agreement 0.0% < 99.0% (allclose)")
    assert float(tags["nodewise.rollout.agreement"]) == 0.0
    assert "challenger" not in aliases(settings)
    assert aliases(settings)["champion"] == "1"
    assert "rolled--challenger" not in serve_apps()
    assert store.get(settings.state.rollouts, NAME) is None
    assert send(champion, 5) == Counter({"1": 5})


def test_a_challenger_that_fails_in_canary_mode_is_rolled_back_and_no_client_sees_it(
    settings: Settings, champion: str
) -> None:
    v3 = challenger(settings, FailsOnLarge(), mode="canary", share="0.5")
    seen = send(champion, 60, LARGE) + send(champion, 20)  # its failures answered by the champion
    assert seen["1"] > 0
    [outcome] = decide_rollouts(settings=settings)
    assert outcome == f"{NAME}: rolled back version {v3}"
    reason = tags_of(v3)["nodewise.rollout.reason"]
    assert reason.startswith("error rate ")
    assert "values over 10" in reason
    assert "challenger" not in aliases(settings)


def test_a_like_challenger_gets_its_canary_share_advances_and_is_promoted_with_no_failed_request(
    settings: Settings, champion: str
) -> None:
    v4 = challenger(settings, TimesIt(2.0), mode="canary", share="0.3,0.6")
    n = 200
    share = send(champion, n)[v4] / n
    assert abs(share - 0.3) < 0.12, share  # 0.3 configured; 3.7 standard deviations of 200 draws
    assert decide_rollouts(settings=settings) == [f"{NAME}: advanced to 60%"]
    assert tags_of(v4)["nodewise.rollout.share_used"] == "0.6"
    share = send(champion, n)[v4] / n
    assert abs(share - 0.6) < 0.12, share
    with LoadClient(f"{champion}/invocations", SMALL) as client:
        wait_until(lambda: client.ok >= 10, 60, "the client served before the decision", every_s=0.1)
        assert decide_rollouts(settings=settings) == [f"{NAME}: promoted version {v4}"]
        served = client.ok
        wait_until(lambda: client.ok >= served + 20, 60, "the client served after the promotion", every_s=0.1)
    assert client.failures == []
    assert client.ok > 20
    assert aliases(settings) == {"champion": v4, "previous": "1"}
    assert tags_of(v4)["nodewise.rollout.status"] == "promoted"
    assert get_record(settings.state.records, NAME).model_version == v4
    assert "rolled--challenger" not in serve_apps()
    assert send(champion, 5) == Counter({v4: 5})


def test_a_decision_killed_half_way_is_finished_by_the_next_run(settings: Settings, champion: str) -> None:
    from prefect.settings import PREFECT_API_URL

    before = aliases(settings)["champion"]
    v5 = challenger(settings, TimesIt(2.0))
    send(champion, 25)
    script = (
        "import sys\nfrom nodewise.core.settings import Settings\nfrom testkit.flows import decide_rollouts\n"
        "decide_rollouts(settings=Settings.model_validate_json(sys.stdin.read()))\n"
    )
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, env=env, cwd=ROOT)
    assert proc.stdin is not None
    proc.stdin.write(settings.model_dump_json().encode())
    proc.stdin.close()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        rollout = store.get(settings.state.rollouts, NAME)
        if rollout is not None and rollout.phase == "promoting":
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    rollout = store.get(settings.state.rollouts, NAME)
    assert rollout is not None
    assert rollout.phase == "promoting"
    assert decide_rollouts(settings=settings) == [f"{NAME}: promoted version {v5}"]
    assert aliases(settings) == {"champion": v5, "previous": before}
    assert tags_of(v5)["nodewise.rollout.status"] == "promoted"
    assert store.get(settings.state.rollouts, NAME) is None
    assert send(champion, 5) == Counter({v5: 5})
    assert decide_rollouts(settings=settings) == []  # nothing left to do
