"""The watchdog on a real DeepSpeed job under mpirun: faults injected into real processes.

`kill -9` of one rank: mpirun stops the others, the watchdog restarts every rank (fresh
rendezvous port) and the endpoint answers the same logits. A job whose ranks die on every
start: restarts stop at the budget and the deployment is marked failed, then left alone. A
watchdog killed in the middle of a restart: the next pass finishes it, and one group runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from nodewise.core.settings import Settings
from testkit.lm import deploy_on_two_ranks, rank_pids, register_tiny_llama
from tests.integration.conftest import RESTARTED_DEEPSPEED, module_settings

IDS = [[5, 17, 33, 60, 2, 9]]


@pytest.fixture(scope="module")
def settings(prefect_harness: None) -> Iterator[Settings]:
    yield from module_settings(**RESTARTED_DEEPSPEED)


@pytest.fixture(scope="module")
def deployed(settings: Settings) -> object:
    return deploy_on_two_ranks(settings, register_tiny_llama(settings, "watchdog-tests"))


def logits(endpoint: str) -> np.ndarray:
    return np.asarray(httpx.post(f"{endpoint}/invocations", json={"inputs": IDS}, timeout=30).json()["predictions"])


def wait_mpirun_gone(settings: Settings, app: str, timeout_s: float = 20) -> None:
    from tasks.mpi.health import exit_code
    from tasks.mpi.records import read_cluster

    cluster = read_cluster(settings, app)
    deadline = time.monotonic() + timeout_s
    while exit_code(cluster) is None:
        assert time.monotonic() < deadline, "mpirun did not stop after a rank was killed"
        time.sleep(0.2)


def test_a_healthy_job_is_left_alone(settings: Settings, deployed: object) -> None:
    from testkit.flows import watch_deployments

    before = rank_pids(deployed.endpoint)
    assert watch_deployments(settings=settings) == []
    assert rank_pids(deployed.endpoint) == before


def test_a_killed_rank_restarts_every_rank_and_the_answers_come_back(settings: Settings, deployed: object) -> None:
    from serving._lm import local_shm_files
    from tasks.mpi.records import read_cluster
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
    from nodewise.ops.status import deployment_status
    from tasks.watchdog.engine import load_watch, reset, watch_once
    from testkit.flows import watch_deployments

    # The restarts left in the budget: all of it when this test runs alone, one less after the killed-rank test.
    apps, _ = load_watch(settings)
    used = len(apps[deployed.app_name].restarts) if deployed.app_name in apps else 0
    left = settings.watchdog.max_restarts - used
    assert left >= 1, apps
    # Every rank now fails to load the model: its weights file is cut short in the store.
    weights = Path(deployed.spec["artifact_uri"].removeprefix("file://")) / "model" / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[:1000])
    try:
        os.kill(rank_pids(deployed.endpoint)[0], signal.SIGKILL)
        wait_mpirun_gone(settings, deployed.app_name)
        failing = [a for _ in range(left) for a in watch_once(settings)]
        assert [a.event for a in failing] == ["nodewise.cluster.restarted"] * left
        assert all(a.outcome.startswith("restart failed: the DeepSpeed ranks did not start") for a in failing)
        [failed] = watch_deployments(settings=settings)  # the flow: the event goes to Prefect too
        assert failed.event == "nodewise.deployment.failed"
        assert "after 3 restarts in 600 s" in failed.cause  # the budget's 3, whoever used them
        assert watch_once(settings) == []  # left alone
        shown = deployment_status(settings)["watchdog"]
        assert shown[-1]["event"] == "nodewise.deployment.failed"
    finally:
        weights.write_bytes(whole)
    assert "restart budget reset" in reset(settings, deployed.app_name)
    [action] = watch_once(settings)
    assert (action.event, action.outcome) == ("nodewise.cluster.restarted", "every rank ready")
    assert len(rank_pids(deployed.endpoint)) == 2


# A watchdog pass in its own process, as `nodewise watchdog --once` runs it (same settings).
WATCH_ONCE = (
    "import sys\n"
    "from nodewise.core.settings import Settings\n"
    "from nodewise.core.runtime import configure_process\n"
    "settings = Settings.model_validate_json(open(sys.argv[1]).read())\n"
    "configure_process(settings)\n"
    "from tasks.watchdog.engine import watch_once\n"
    "watch_once(settings)\n"
)


def test_a_watchdog_killed_mid_restart_is_finished_by_the_next_pass_with_one_group(
    settings: Settings, deployed: object, tmp_path: Path
) -> None:
    from tasks.mpi.hosts import job_sessions
    from tasks.mpi.records import cluster_dir, read_cluster
    from tasks.watchdog.engine import load_watch, watch_once

    spec_path = cluster_dir(settings, deployed.app_name) / "spec.json"
    expected = logits(deployed.endpoint)
    old = read_cluster(settings, deployed.app_name)
    os.kill(rank_pids(deployed.endpoint)[1], signal.SIGKILL)
    wait_mpirun_gone(settings, deployed.app_name)

    saved = tmp_path / "settings.json"
    saved.write_text(settings.model_dump_json())
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    watchdog = subprocess.Popen([sys.executable, "-c", WATCH_ONCE, str(saved)], env=env)
    deadline = time.monotonic() + 120
    while (now := read_cluster(settings, deployed.app_name)) is None or now.pid == old.pid:
        assert watchdog.poll() is None, "the watchdog ended before it relaunched the ranks"
        assert time.monotonic() < deadline, "the watchdog did not relaunch the ranks"
        time.sleep(0.1)
    watchdog.kill()  # mid-restart: the new ranks are starting, the restart is not finished
    watchdog.wait(timeout=30)
    half_started = now.pid
    assert load_watch(settings)[0][deployed.app_name].pending == "cluster restart"

    [action] = watch_once(settings)
    assert (action.event, action.cause) == ("nodewise.cluster.restarted", "finishing an interrupted cluster restart")
    assert action.outcome == "every rank ready"
    final = read_cluster(settings, deployed.app_name)
    assert final.pid != half_started
    assert job_sessions(spec_path) == [final.pid]  # one group: the half-started one was stopped, not doubled
    assert len(rank_pids(deployed.endpoint)) == 2
    np.testing.assert_allclose(logits(deployed.endpoint), expected, rtol=1e-5, atol=1e-6)
    assert load_watch(settings)[0][deployed.app_name].pending is None
    assert watch_once(settings) == []  # healthy
