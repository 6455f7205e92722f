"""The front of a real DeepSpeed deployment (serving/front.py, tasks/mpi/front.py): a new version
started beside the running group (tasks/mpi/upgrade.py) takes over under a steady client with no
request failed, and one that fails its smoke test leaves the running group serving; a rank killed
with SIGKILL under a steady client, the watchdog restarts the whole group (the upgraded one), and
no request safe to repeat fails; a greedy stream cut by the restart goes on with the text of an
undisturbed run."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from nodewise.core.settings import Settings
from testkit.lm import deploy_on_two_ranks, rank_pids, register_tiny_llama, whole_stream
from testkit.load import LoadClient
from tests.integration.conftest import RESTARTED_DEEPSPEED, module_settings

IDS = [5, 17, 33, 60, 2, 9]
NEW_TOKENS = 96


@pytest.fixture(scope="module")
def settings(prefect_harness: None) -> Iterator[Settings]:
    yield from module_settings(**RESTARTED_DEEPSPEED)


@pytest.fixture(scope="module")
def deployed(settings: Settings) -> Any:
    return deploy_on_two_ranks(settings, register_tiny_llama(settings, "front-tests"))


def _stream(endpoint: str, chunks: list[dict[str, Any]], first_token: threading.Event | None = None) -> None:
    """A streamed greedy generation through the front, its chunks kept as they come."""
    body = {"input_ids": [IDS], "max_new_tokens": NEW_TOKENS, "stream": True}
    with httpx.stream("POST", f"{endpoint}/generate", json=body, timeout=120) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line.removeprefix("data: ")))
                if first_token is not None and len(chunks) >= 3:
                    first_token.set()
                    time.sleep(0.02)  # a slow reader: the kill lands mid-stream


def _text(chunks: list[dict[str, Any]]) -> tuple[list[int], str]:
    return [c["token_id"] for c in chunks if "token_id" in c], "".join(c.get("text", "") for c in chunks)


def test_the_endpoint_is_the_front_and_rank_0_has_a_port_of_its_own(settings: Settings, deployed: Any) -> None:
    from tasks.mpi.front import read_front
    from tasks.mpi.records import read_cluster

    front, cluster = read_front(settings, deployed.app_name), read_cluster(settings, deployed.app_name)
    assert deployed.endpoint == front.endpoint == f"http://127.0.0.1:{settings.deepspeed.port}"
    assert cluster.port != settings.deepspeed.port
    assert front.upstream == cluster.endpoint
    assert httpx.get(f"{deployed.endpoint}/front", timeout=5).json()["ready"] is True


def _steady_clients(endpoint: str) -> tuple[LoadClient, LoadClient]:
    """Whole and streamed greedy generations through the front, each answer checked whole."""
    whole = json.dumps({"input_ids": [IDS], "max_new_tokens": 8}).encode()
    streamed = json.dumps({"input_ids": [IDS], "max_new_tokens": 8, "stream": True}).encode()
    return (
        LoadClient(f"{endpoint}/generate", whole, workers=2, timeout_s=120),
        LoadClient(f"{endpoint}/generate", streamed, workers=1, timeout_s=120, stream=True, check=whole_stream(8)),
    )


def test_a_new_version_starts_beside_the_running_one_and_takes_over_with_no_request_failed(
    settings: Settings, deployed: Any
) -> None:
    import psutil

    from nodewise.ops.status import deployment_status
    from tasks.mpi.front import read_front
    from tasks.mpi.records import GROUP_PREFIX, read_cluster

    old = read_cluster(settings, deployed.app_name)
    old_ranks = rank_pids(old.endpoint)
    v2 = register_tiny_llama(settings, "front-tests", seed=1)
    whole, streams = _steady_clients(deployed.endpoint)
    with whole, streams:
        time.sleep(1.0)
        upgraded = deploy_on_two_ranks(settings, v2)
        time.sleep(1.0)
    assert whole.failures == []
    assert streams.failures == []
    assert whole.ok > 4
    assert streams.ok > 1
    assert upgraded.endpoint == deployed.endpoint
    assert upgraded.replaced.startswith("upgraded beside the old group (")  # kept in the record ...
    [row] = [r for r in deployment_status(settings)["deployments"] if r["app"] == deployed.app_name]
    assert row["replaced"] == upgraded.replaced  # ... and in what status shows
    assert httpx.get(f"{deployed.endpoint}/version", timeout=5).json()["version"] == upgraded.model_version != "1"
    new = read_cluster(settings, deployed.app_name)
    assert os.path.basename(os.path.dirname(new.spec_path)).startswith(GROUP_PREFIX)  # it ran beside the old one
    assert read_front(settings, deployed.app_name).upstream == new.endpoint
    assert not [pid for pid in [old.pid, *old_ranks] if psutil.pid_exists(pid)]


def test_a_new_version_failing_its_smoke_test_leaves_the_running_one_serving(settings: Settings, deployed: Any) -> None:
    """The group launched beside is the running version's own, checked against version 1's logits: a
    real smoke test that fails."""
    from mlflow import MlflowClient

    from nodewise.core.errors import DeployFailed
    from serving.spec import DeepSpeedSpec
    from tasks.mpi.deploy import deploy_cluster, smoke_test_lm
    from tasks.mpi.records import GROUP_PREFIX, read_cluster
    from tasks.planning.placement import PlacementPlan
    from tasks.planning.registry import resolve_model
    from tasks.records import get_record

    running = read_cluster(settings, deployed.app_name)
    spec = DeepSpeedSpec.model_validate(get_record(settings.state.records, deployed.app_name).spec)
    v1, v1_spec = resolve_model(deployed.model_uri, MlflowClient()), DeepSpeedSpec.model_validate(deployed.spec)
    plan = PlacementPlan(
        fits=True, backend="deepspeed_mpi", layout="multi-node", needed_bytes=1, budget_bytes=1,
        largest_budget_bytes=1, nodes=2, hosts=["localhost", "localhost"],
    )  # fmt: skip
    whole, streams = _steady_clients(deployed.endpoint)
    with whole, streams:
        time.sleep(1.0)
        with pytest.raises(DeployFailed, match="the new group was stopped; version 2 serves on"):
            deploy_cluster(spec, plan, settings, lambda endpoint: smoke_test_lm(endpoint, v1, v1_spec, settings.smoke))
    assert whole.failures == []
    assert streams.failures == []
    assert read_cluster(settings, deployed.app_name) == running
    groups = settings.state.deepspeed_job(deployed.app_name).glob(f"{GROUP_PREFIX}*")
    assert [str(g) for g in groups] == [os.path.dirname(running.spec_path)]  # the running group's own, no other
    assert len({*rank_pids(running.endpoint)}) == running.ranks  # its own ranks, still ready


def test_a_killed_rank_fails_no_safe_request_and_the_stream_goes_on(settings: Settings, deployed: Any) -> None:
    from tasks.mpi.health import exit_code
    from tasks.mpi.records import read_cluster
    from tasks.watchdog.engine import watch_once

    undisturbed: list[dict[str, Any]] = []
    _stream(deployed.endpoint, undisturbed)
    whole = json.dumps({"input_ids": [IDS], "max_new_tokens": 8}).encode()
    cut: list[dict[str, Any]] = []
    started = threading.Event()
    reader = threading.Thread(target=_stream, args=(deployed.endpoint, cut, started))
    with LoadClient(f"{deployed.endpoint}/generate", whole, workers=2, timeout_s=120) as load:
        time.sleep(1.0)
        reader.start()
        assert started.wait(60)
        os.kill(rank_pids(read_cluster(settings, deployed.app_name).endpoint)[1], signal.SIGKILL)
        cluster = read_cluster(settings, deployed.app_name)
        deadline = time.monotonic() + 30
        while exit_code(cluster) is None:
            assert time.monotonic() < deadline, "mpirun did not stop after a rank was killed"
            time.sleep(0.2)
        actions = {a.event: a for a in watch_once(settings)}
        assert actions["nodewise.cluster.restarted"].outcome == "every rank ready"
        held = actions["nodewise.front.held"]  # what the restart cost the clients, reported in the same pass
        assert held.counts is not None
        assert held.counts["retried"] >= 1, held
        assert held.counts["refused"] == 0, held
        assert held.target == "front"
        assert held.cause.startswith("the front held ")
        reader.join(120)
        time.sleep(1.0)
    failed = [o for o in load.log if not o.ok]
    assert failed == [], failed[:3]
    assert len(load.log) > 4
    assert _text(cut) == _text(undisturbed)
    metrics = httpx.get(f"{deployed.endpoint}/metrics", timeout=5).text
    assert f'nodewise_front_streams_continued_total{{app="{deployed.app_name}"}} 1.0' in metrics
    assert cut[-1]["usage"]["completion_tokens"] == NEW_TOKENS


def test_status_shows_the_front_and_down_stops_it(settings: Settings, deployed: Any) -> None:
    from nodewise.core.procs import port_open
    from nodewise.ops.status import deployment_status, stop_everything

    [row] = [r for r in deployment_status(settings)["deployments"] if r["app"] == deployed.app_name]
    assert row["front"] == "serving"
    assert row["endpoint"] == deployed.endpoint
    stop_everything(settings)
    assert not port_open("127.0.0.1", settings.deepspeed.port)
