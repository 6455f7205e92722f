"""The watchdog on real Ray Serve replicas: faults injected into one replica's process.

A hung replica (SIGSTOP) under a steady client, one that fails every request and one that
leaks memory past its limit: each is restarted alone (the other replica keeps its actor id)
and the endpoint keeps answering. A model whose every replica is sick burns its restart
budget and is then marked failed and left alone.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from nodewise.core.settings import Settings
from tasks.records import DeploymentRecord
from testkit import LoadClient, running_replicas, wait_for_events, wait_until
from testkit.flows import deploy_model
from testkit.models import FaultOnFlag, register_pyfunc

from .conftest import module_settings

BODY = json.dumps({"inputs": [[1.0, 2.0, 3.0]]}).encode()
LIMIT = 900 * 2**20  # a pyfunc replica here holds ~300-450 MiB


@pytest.fixture(scope="module")
def settings(prefect_harness: None) -> Iterator[Settings]:
    yield from module_settings(
        serve={"replicas": 2, "memory_limit_bytes": LIMIT},
        watchdog={"canary_timeout_s": 5, "backoff_s": 0, "max_restarts": 10, "min_requests": 5},
    )


@pytest.fixture(scope="module")
def flags(settings: Settings) -> Path:
    folder = settings.state_path / "flags"
    folder.mkdir()
    return folder


@pytest.fixture(scope="module")
def deployed(settings: Settings, flags: Path) -> DeploymentRecord:
    uri = register_pyfunc(FaultOnFlag(str(flags)), "faulty", str(settings.state.artifacts))
    return deploy_model(uri, settings=settings)


def replicas(app: str) -> dict[str, dict]:
    """RUNNING replicas by actor id."""
    return running_replicas(app)


def answers(endpoint: str) -> bool:
    response = httpx.post(f"{endpoint}/invocations", content=BODY, timeout=30)
    return response.status_code == 200 and response.json() == {"predictions": [[2.0, 4.0, 6.0]]}


def restart_one(settings: Settings, deployed: DeploymentRecord, sick: dict) -> object:
    """One watchdog pass: exactly the sick replica is restarted, the other keeps its actor id."""
    from tasks.watchdog.engine import watch_once

    before = replicas(deployed.app_name)
    seen = []
    actions = watch_once(settings, emit=seen.append)
    restarted = [a for a in actions if a.event == "nodewise.replica.restarted"]
    assert len(restarted) == 1, actions
    assert seen == actions
    assert restarted[0].target.startswith(f"replica {sick['replica_id']} (pid {sick['pid']}")
    assert restarted[0].outcome == "replaced; 2 replicas running"
    after = replicas(deployed.app_name)
    assert len(after) == 2
    assert sick["actor_id"] not in after
    kept = set(before) - {sick["actor_id"]}
    assert kept <= set(after)  # the healthy replica is untouched
    assert answers(deployed.endpoint)
    return restarted[0]


def test_a_healthy_app_is_left_alone(settings: Settings, deployed: DeploymentRecord) -> None:
    from tasks.watchdog.engine import watch_once

    before = set(replicas(deployed.app_name))
    assert watch_once(settings) == []
    assert set(replicas(deployed.app_name)) == before


def test_a_hung_replica_is_restarted_alone_and_the_endpoint_keeps_answering(
    settings: Settings, deployed: DeploymentRecord
) -> None:
    sick = next(iter(replicas(deployed.app_name).values()))
    with LoadClient(f"{deployed.endpoint}/invocations", BODY, workers=4) as client:
        wait_until(lambda: client.ok >= 10, 60, "the client served before the fault", every_s=0.1)
        os.kill(sick["pid"], signal.SIGSTOP)
        action = restart_one(settings, deployed, sick)
        assert action.cause == "canary inference took over 5 s (hung or overloaded)"
        served_before = client.ok
        # It keeps answering after the restart.
        wait_until(lambda: client.ok >= served_before + 40, 60, "answers after the restart", every_s=0.1)
    # Only requests already on the hung replica may fail (at most one per client thread).
    assert sum(n for outcome, n in client.outcomes.items() if outcome != "200") <= 4, client.failures


def test_a_killed_replica_fails_no_request_its_calls_go_to_the_other(
    settings: Settings, deployed: DeploymentRecord
) -> None:
    """SIGKILL of one replica under a steady client: HAProxy sends what was in flight on it to the
    other replica (``serve.retries``), and Serve starts a replacement; no client sees an error, but
    for one window HAProxy cannot repair: the replica's uvicorn writes an answer's head and its body
    in two writes, and a kill between them leaves a response already begun (the head passed on to
    the client), which is never sent again. Seen once in a clean-clone CI run (2026-12-07: "received
    0 bytes, expected 31"); at most one request can be in that state (the replica writes one at a
    time)."""
    before = replicas(deployed.app_name)
    victim = next(iter(before.values()))
    with LoadClient(f"{deployed.endpoint}/invocations", BODY, workers=4) as client:
        wait_until(lambda: client.ok >= 40, 60, "the client served before the fault", every_s=0.1)
        os.kill(victim["pid"], signal.SIGKILL)
        wait_until(
            lambda: len(now := replicas(deployed.app_name)) == 2 and victim["actor_id"] not in now,
            120,
            "Serve replaced the killed replica",
        )
        served = client.ok
        wait_until(lambda: client.ok >= served + 40, 60, "answers after the replacement", every_s=0.1)
    cut = [line for line in client.failures if "RemoteProtocolError" in line and "received 0 bytes" in line]
    assert len(cut) <= 1, client.failures  # the head-then-body window above
    assert len(client.failures) == len(cut), client.failures  # nothing else failed


def test_a_replica_failing_every_request_is_restarted_alone(
    settings: Settings, deployed: DeploymentRecord, flags: Path
) -> None:
    from tasks.rayserve.watch import observe, replica_problem

    sick = next(iter(replicas(deployed.app_name).values()))
    time.sleep(5.5)  # out of the window below: the earlier tests' traffic
    (flags / f"{sick['pid']}.fail").touch()
    for _ in range(20):
        httpx.post(f"{deployed.endpoint}/invocations", content=BODY, timeout=30)
    record = deployed.model_copy(update={"canary": None})  # the error rate alone makes it sick
    recent = settings.watchdog.model_copy(update={"error_window_s": 5.0})  # these requests, not earlier traffic
    [seen] = [r for r in observe(record, recent).replicas if r.pid == sick["pid"]]
    assert seen.vitals["errors"] >= 5
    assert seen.vitals["errors"] == seen.vitals["requests"]
    problem = replica_problem(seen, deployed.spec["max_error_rate"], recent)
    assert problem == f"{seen.vitals['errors']} of {seen.vitals['requests']} requests failed in the last 5 s"
    action = restart_one(settings, deployed, sick)
    assert action.cause.startswith("canary inference failed: RuntimeError")
    assert "injected fault" in action.cause


def test_a_replica_leaking_memory_is_restarted_alone(
    settings: Settings, deployed: DeploymentRecord, flags: Path
) -> None:
    sick = next(iter(replicas(deployed.app_name).values()))
    (flags / f"{sick['pid']}.leak").touch()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # until this replica has taken enough requests to pass its limit
        for _ in range(4):
            httpx.post(f"{deployed.endpoint}/invocations", content=BODY, timeout=30)
        from psutil import Process

        if Process(sick["pid"]).memory_info().rss > LIMIT:
            break
    action = restart_one(settings, deployed, sick)
    assert action.cause.startswith("memory ")
    assert action.cause.endswith(f"MiB is past its limit {LIMIT // 2**20} MiB")


def test_a_replica_that_stays_sick_exhausts_the_budget_and_is_left_alone(
    settings: Settings, deployed: DeploymentRecord, flags: Path
) -> None:
    from nodewise.ops.status import deployment_status
    from tasks.watchdog.engine import load_watch, reset, watch_once
    from testkit.flows import watch_deployments

    limited = settings.model_copy(update={"watchdog": settings.watchdog.model_copy(update={"max_restarts": 1})})
    reset(settings, deployed.app_name)
    # Every replica's pid is flagged as failing, replacements included (pids are flagged as they appear).
    events = []
    deadline = time.monotonic() + 180
    while not any(a.event == "nodewise.deployment.failed" for a in events):
        assert time.monotonic() < deadline, events
        for replica in replicas(deployed.app_name).values():
            (flags / f"{replica['pid']}.fail").touch()
        events += watch_deployments(settings=limited)  # the flow: its actions go to Prefect as events
    failed = events[-1]
    assert failed.event == "nodewise.deployment.failed"
    assert "after 1 restarts in 600 s" in failed.cause
    assert load_watch(settings)[0][deployed.app_name].failed is not None
    ids = set(replicas(deployed.app_name))
    assert watch_once(limited) == []  # left alone: nothing restarted
    assert set(replicas(deployed.app_name)) == ids
    assert deployment_status(settings)["watchdog"][-1]["event"] == "nodewise.deployment.failed"
    seen = wait_for_events(["nodewise.deployment.failed"], resource=f"nodewise.deployment.{deployed.app_name}")
    assert seen[0]["payload"]["cause"] == failed.cause
    assert seen[0]["payload"]["version"] == deployed.model_version
