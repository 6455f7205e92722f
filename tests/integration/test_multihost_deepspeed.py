"""The multi-node backend across real network hosts: DeepSpeed ranks in separate namespaces.

Three namespace hosts on a bridge (testkit/hosts.py); mpirun reaches them through its remote-shell
agent, as it reaches machines through ssh. The flow plans the tiny Llama on two of them (the third
is a spare): each host runs one rank (its own LOCAL_RANK 0 / LOCAL_SIZE 1), gloo talks TCP between
them, rank 0 answers on its host's address. Then one journey of faults: a node dies (the spare
takes its place), a second dies (too few nodes: degraded, relaunched when one returns), a host is
cut off (the hang is seen, the group restarts on reachable hosts, and nothing is left on the cut
host once it is back). Lean by design; benchmarks/multihost.py measures the rest.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from nodewise.core.settings import Settings
from testkit import hosts as netns
from testkit import wait_for_events, wait_until
from testkit.lm import register_tiny_llama
from tests.integration.conftest import module_settings

pytestmark = pytest.mark.multihost


@pytest.fixture(scope="module")
def lan() -> Iterator[netns.Hosts]:
    if not netns.available():
        pytest.skip(netns.why_unavailable())
    with netns.hosts(3) as made:
        yield made


@pytest.fixture(scope="module")
def settings(prefect_harness: None, lan: netns.Hosts) -> Iterator[Settings]:
    from prefect.settings import PREFECT_API_URL

    yield from module_settings(
        prefect={"api_url": PREFECT_API_URL.value()},  # the ranks' supervisor posts its event there
        deepspeed={
            "ready_timeout_s": 400,
            "heartbeat_timeout_s": 5,
            "remote_shell": str(lan.agent),
            "mpirun_args": lan.mpirun_args(),
            "host_check_timeout_s": 3,
            "stop_grace_s": 3,
        },
        watchdog={"canary_timeout_s": 5, "backoff_s": 0, "max_restarts": 10},
    )


@pytest.fixture(scope="module")
def deployed(settings: Settings, lan: netns.Hosts) -> Any:
    from mlflow import MlflowClient

    from nodewise.demo_models import too_small_inventory
    from tasks.planning.profile_models import profile_with_cache
    from tasks.planning.registry import resolve_model
    from testkit.flows import deploy_model

    model_uri = register_tiny_llama(settings, "multihost-tests")
    model = resolve_model(model_uri, MlflowClient())
    profile = profile_with_cache(model, batch_size=settings.serve.max_batch_size, device="cpu")
    inventory = too_small_inventory(
        settings.state_path / "nodes.yaml", profile.total_bytes, profile.per_rank_bytes(2), 0.9, lan.addresses
    )
    return deploy_model(model_uri, inventory=inventory, settings=settings)


def _ranks(endpoint: str) -> list[dict[str, Any]]:
    health = httpx.get(f"{endpoint}/health", timeout=5).json()
    assert health["ready"], health
    return health["ranks"]


def _host_of(lan: netns.Hosts, pid: int) -> str | None:
    return next((h.address for h in lan.hosts if pid in h.pids()), None)


def _restarted(settings: Settings, deadline_s: float) -> tuple[Any, Any]:
    """The first cluster restart and the one that got every rank ready (the same one, or a retry at
    a later pass: a launch that fails, e.g. a host's Open MPI daemon that could not start, is
    retried within the watchdog's budget)."""
    seen: list[Any] = []
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        seen += _watch_until(settings, "nodewise.cluster.restarted", deadline_s)
        restarts = [a for a in seen if a.event == "nodewise.cluster.restarted"]
        ok = [a for a in restarts if a.outcome == "every rank ready"]
        if ok:
            assert all(a.outcome.startswith("restart failed: ") for a in restarts[: restarts.index(ok[0])])
            return restarts[0], ok[0]
    raise AssertionError(f"no restart got every rank ready within {deadline_s} s: {[a.model_dump() for a in seen]}")


def _watch_until(settings: Settings, wanted: str, deadline_s: float) -> list[Any]:
    from tasks.watchdog.engine import watch_once

    seen: list[Any] = []

    def acted() -> bool:
        seen.extend(watch_once(settings))
        return any(a.event == wanted for a in seen)

    wait_until(acted, deadline_s, f"the watchdog's {wanted}", seen=lambda: [a.model_dump() for a in seen])
    return seen


def test_ranks_on_two_hosts_cooperate_and_answer_like_the_whole_model(
    settings: Settings, lan: netns.Hosts, deployed: Any
) -> None:
    from nodewise.ops.status import deployment_status
    from serving._lm import LanguageModel
    from serving.spec import DeepSpeedSpec

    h0, h1, h2 = lan.addresses
    assert deployed.backend == "deepspeed_mpi"
    from tasks.mpi.front import read_front
    from tasks.mpi.records import read_cluster

    rank0 = read_cluster(settings, deployed.app_name).endpoint
    assert rank0.startswith(f"http://{h0}:")  # rank 0 answers on its host's address
    front = read_front(settings, deployed.app_name)
    assert front is not None
    assert (deployed.endpoint, front.upstream) == (front.endpoint, rank0)  # users call the front, rank 0 behind it
    # the front listens on every interface of the control machine: recorded at its address on the
    # hosts' network (the route to rank 0), which a client elsewhere can use, never loopback
    assert deployed.endpoint == f"http://{lan.this_host}:{settings.deepspeed.port}"
    ranks = _ranks(deployed.endpoint)
    assert [(r["rank"], r["host"]) for r in ranks] == [(0, h0), (1, h1)]  # heartbeats from each host
    assert [_host_of(lan, r["pid"]) for r in ranks] == [h0, h1]  # each rank is a process on its host
    assert lan[2].pids() == []  # the spare runs nothing
    log = (settings.state.deepspeed_job(deployed.app_name) / "mpirun.log").read_text()
    assert f"master {h0}:" in log

    ids = np.asarray([[3, 4, 5, 6, 7, 8]])
    whole = LanguageModel.load(
        DeepSpeedSpec.model_validate(deployed.spec).model_copy(update={"tp_size": 1, "device": "cpu"})
    )
    got = httpx.post(f"{deployed.endpoint}/invocations", json={"inputs": ids.tolist()}, timeout=60).json()
    np.testing.assert_allclose(np.asarray(got["predictions"]), whole.forward(ids), rtol=1e-4, atol=1e-5)
    generated = httpx.post(
        f"{deployed.endpoint}/generate", json={"input_ids": ids.tolist(), "max_new_tokens": 4}, timeout=60
    ).json()
    assert generated == {"output_ids": whole.generate([ids[0]], 4)}

    bad = httpx.post(f"{deployed.endpoint}/invocations", json={"inputs": [[10**9]]}, timeout=30)
    assert bad.status_code == 400, bad.text
    assert [r["pid"] for r in _ranks(deployed.endpoint)] == [r["pid"] for r in ranks]  # every rank still up

    [row] = deployment_status(settings)["deployments"]
    assert (row["hosts"], row["rank_hosts"], row["spare_hosts"]) == ([h0, h1], [h0, h1], [h2])
    assert row["health"] == "healthy"


def test_a_dead_node_is_replaced_by_the_spare_and_told_at_once(
    settings: Settings, lan: netns.Hosts, deployed: Any
) -> None:
    from tasks.mpi.health import exited_at
    from tasks.mpi.records import read_cluster

    h0, h1, h2 = lan.addresses
    killed_at = time.time()
    assert lan.kill_host(lan[1]) >= 1  # the node of rank 1 dies
    cluster = read_cluster(settings, deployed.app_name)
    wait_until(lambda: exited_at(cluster) is not None, 60, "mpirun exited after its host died", every_s=0.2)
    event = _exited_event(deployed.app_name, since=killed_at)
    assert event["payload"]["hosts"] == [h0, h1]

    first, restart = _restarted(settings, 240)
    assert (first.hosts_before, restart.hosts_after) == ([h0, h1], [h0, h2])
    ranks = _ranks(deployed.endpoint)
    assert [(r["host"], _host_of(lan, r["pid"])) for r in ranks] == [(h0, h0), (h2, h2)]
    assert lan[1].pids() == []


def test_too_few_nodes_is_degraded_until_a_node_returns(settings: Settings, lan: netns.Hosts, deployed: Any) -> None:
    h0, h1, _ = lan.addresses
    lan.kill_host(lan[2])  # the spare, now serving, dies too: one of three hosts is left
    actions = _watch_until(settings, "nodewise.deployment.degraded", 120)
    [degraded] = [a for a in actions if a.event == "nodewise.deployment.degraded"]
    assert "not enough nodes: the job needs 2 host(s) and only 1 of 3 answer" in degraded.cause
    assert lan.leftovers() == {}  # the survivor on h0 was stopped: it cannot go on alone
    assert _watch_until_quiet(settings) == []  # reported once, not at every pass

    lan.revive(lan[1])
    _, restart = _restarted(settings, 240)
    assert restart.hosts_after == [h0, h1], restart
    assert [r["host"] for r in _ranks(deployed.endpoint)] == [h0, h1]
    recovered = _watch_until(settings, "nodewise.deployment.recovered", 30)
    assert recovered[-1].event == "nodewise.deployment.recovered"
    lan.revive(lan[2])


def test_a_cut_off_host_is_seen_hanging_and_left_clean_when_it_returns(
    settings: Settings, lan: netns.Hosts, deployed: Any
) -> None:
    h0, _, h2 = lan.addresses
    lan.cut(lan[1])  # a partition: rank 1 lives on, unreachable; rank 0 blocks in its next collective
    _, restart = _restarted(settings, 300)
    assert restart.hosts_after == [h0, h2]
    assert lan[1].pids(), "the cut-off host's rank should still be running while it is unreachable"
    lan.mend(lan[1])
    from tasks.watchdog.engine import watch_once

    watch_once(settings)  # the next pass reaches the host again and stops the rank left there
    # Its orted then finds mpirun gone and exits (~2 s).
    wait_until(lambda: not lan[1].pids(), 30, "no process left on the mended host", seen=lan[1].processes)
    assert lan[1].processes() == []

    from nodewise.ops.status import stop_everything

    stop_everything(settings)
    assert lan.leftovers() == {}  # `down` leaves nothing on any host


def _watch_until_quiet(settings: Settings) -> list[Any]:
    from tasks.watchdog.engine import watch_once

    return watch_once(settings) + watch_once(settings)


def _exited_event(app: str, since: float, timeout_s: float = 15) -> dict[str, Any]:
    """The ``nodewise.cluster.exited`` event the supervisor posted, read back from Prefect's API."""
    found = wait_for_events(
        ["nodewise.cluster.exited"], any_resource=f"nodewise.deployment.{app}", since=since - 5, timeout_s=timeout_s
    )
    return found[0]
