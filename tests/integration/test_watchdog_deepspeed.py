"""The watchdog on a real DeepSpeed job under mpirun: faults injected into real processes.

`kill -9` of one rank: mpirun stops the others, the watchdog restarts every rank (fresh
rendezvous port) and the endpoint answers the same logits. A job whose ranks die on every
start: restarts stop at the budget and the deployment is marked failed, then left alone.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from nodewise.core.settings import Settings
from tests.integration.conftest import module_settings
from tests.integration.lm import deploy_on_two_ranks, rank_pids, register_tiny_llama

IDS = [[5, 17, 33, 60, 2, 9]]


@pytest.fixture(scope="module")
def settings(prefect_harness: None) -> Iterator[Settings]:
    yield from module_settings(
        deepspeed={"ready_timeout_s": 400, "heartbeat_timeout_s": 5},
        watchdog={"max_restarts": 3, "window_s": 600, "backoff_s": 0, "canary_timeout_s": 10},
    )


@pytest.fixture(scope="module")
def deployed(settings: Settings) -> object:
    return deploy_on_two_ranks(settings, register_tiny_llama(settings, "watchdog-tests"))


def logits(endpoint: str) -> np.ndarray:
    return np.asarray(httpx.post(f"{endpoint}/invocations", json={"inputs": IDS}, timeout=30).json()["predictions"])


def wait_mpirun_gone(settings: Settings, app: str, timeout_s: float = 20) -> None:
    from tasks.mpi.launcher import exit_code, read_cluster

    cluster = read_cluster(settings, app)
    deadline = time.monotonic() + timeout_s
    while exit_code(cluster) is None:
        assert time.monotonic() < deadline, "mpirun did not stop after a rank was killed"
        time.sleep(0.2)


def test_a_healthy_job_is_left_alone(settings: Settings, deployed: object) -> None:
    from tests.flows import watch_deployments

    before = rank_pids(deployed.endpoint)
    assert watch_deployments(settings=settings) == []
    assert rank_pids(deployed.endpoint) == before


def test_a_killed_rank_restarts_every_rank_and_the_answers_come_back(settings: Settings, deployed: object) -> None:
    from serving._lm import local_shm_files
    from tasks.mpi.launcher import read_cluster
    from tasks.watchdog.engine import watch_once

    expected = logits(deployed.endpoint)
    old = read_cluster(settings, deployed.app_name)
    pids = rank_pids(deployed.endpoint)
    os.kill(pids[1], signal.SIGKILL)
    wait_mpirun_gone(settings, deployed.app_name)

    seen = []
    [action] = watch_once(settings, emit=seen.append)
    assert seen == [action]
    assert action.event == "nodewise.cluster.restarted"
    assert action.cause.startswith("mpirun exited")
    assert action.outcome == "every rank ready"
    assert action.duration_s is not None
    new = read_cluster(settings, deployed.app_name)
    assert new.master_port != old.master_port  # a fresh rendezvous
    assert set(rank_pids(deployed.endpoint)).isdisjoint(pids)  # every rank is new, survivors too
    np.testing.assert_allclose(logits(deployed.endpoint), expected, rtol=1e-5, atol=1e-6)
    assert local_shm_files(old.master_addr, old.master_port) == []
    assert watch_once(settings) == []  # healthy again


def test_ranks_that_die_on_every_start_stop_at_the_budget(settings: Settings, deployed: object) -> None:
    from nodewise.cli.status import deployment_status
    from tasks.watchdog.engine import reset, watch_once
    from tests.flows import watch_deployments

    # Every rank now fails to load the model: its weights file is cut short in the store.
    weights = Path(deployed.spec["artifact_uri"].removeprefix("file://")) / "model" / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[:1000])
    try:
        os.kill(rank_pids(deployed.endpoint)[0], signal.SIGKILL)
        wait_mpirun_gone(settings, deployed.app_name)
        first = watch_once(settings)
        second = watch_once(settings)
        assert [a.event for a in first + second] == ["nodewise.cluster.restarted"] * 2
        assert all(a.outcome.startswith("restart failed: the DeepSpeed ranks did not start") for a in first + second)
        [failed] = watch_deployments(settings=settings)  # the flow: the event goes to Prefect too
        assert failed.event == "nodewise.deployment.failed"
        assert "after 3 restarts in 600 s" in failed.cause  # one in the test before, two here
        assert watch_once(settings) == []  # left alone
        shown = deployment_status(settings)["watchdog"]
        assert shown[-1]["event"] == "nodewise.deployment.failed"
    finally:
        weights.write_bytes(whole)
    assert "restart budget reset" in reset(settings, deployed.app_name)
    [action] = watch_once(settings)
    assert (action.event, action.outcome) == ("nodewise.cluster.restarted", "every rank ready")
    assert len(rank_pids(deployed.endpoint)) == 2
