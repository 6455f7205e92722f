"""Deploying onto an existing Ray cluster: two real nodes on this host (`ray start --head` +
`ray start --address`), token authentication on, replicas spread over both nodes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from nodewise.core.runtime import configure_process, serve_environment
from nodewise.core.settings import Settings
from tasks.records import DeploymentRecord
from testkit import running_replicas, serve_replicas, wait_until
from testkit.flows import deploy_model

from .conftest import _SESSION_RAY_TOKEN, free_port_block, make_settings


def _stop_processes_of(marker: str) -> None:
    procs = [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
    for proc in procs:
        proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=15)
    for proc in alive:
        proc.kill()


@pytest.fixture(scope="module")
def two_node_cluster(prefect_harness: None) -> Iterator[tuple[str, Settings]]:
    saved = dict(os.environ)
    temp = Path(tempfile.mkdtemp(prefix="nw2n-", dir="/tmp"))
    port = free_port_block(5)
    token = temp / "token"
    token.write_text(_SESSION_RAY_TOKEN)  # this test process's Ray token (read once per process)
    ray_bin = str(Path(sys.executable).with_name("ray"))
    # The cluster's owner starts it with Ray Serve's switches, as the README says.
    local_like = make_settings()
    env = {
        # A cluster other machines may join (not nodewise's one-machine local instance).
        **{k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"},
        **serve_environment(local_like),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    common = ["--num-cpus=1", f"--temp-dir={temp / 'ray'}", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    made: list[Settings] = []
    head_ports = [f"--ray-client-server-port={port + 1}", f"--dashboard-agent-listen-port={port + 2}"]
    try:
        subprocess.run(
            [ray_bin, "start", "--head", f"--port={port}", "--include-dashboard=false", *common, *head_ports],
            env=env,
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [ray_bin, "start", f"--address=127.0.0.1:{port}", f"--dashboard-agent-listen-port={port + 3}", *common],
            env=env,
            check=True,
            capture_output=True,
        )
        settings = make_settings(ray={"address": f"127.0.0.1:{port}"}, serve={"replicas": 2})
        made.append(settings)
        configure_process(settings)
        os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)})
        yield f"127.0.0.1:{port}", settings
    finally:
        import ray

        ray.shutdown()
        _stop_processes_of(str(temp))
        # Serve's HAProxy runs from the HAProxy folder of ``local_like`` (its RAY_SERVE_HAPROXY_* paths),
        # not from ``temp``: left running, it holds ports 8404/9101 and the next module's HAProxy cannot start.
        _stop_processes_of(str(local_like.state.haproxy))
        os.environ.clear()
        os.environ.update(saved)
        for folder in (temp, local_like.state_path, *(s.state_path for s in made)):
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def deployed(two_node_cluster: tuple[str, Settings]) -> DeploymentRecord:
    """The demo model deployed onto the two-node cluster (two replicas)."""
    from nodewise.demo_models import register_demo_model

    address, settings = two_node_cluster
    model = register_demo_model(str(settings.state.artifacts))
    return deploy_model(f"models:/{model.name}@champion", inventory=f"ray:{address}", settings=settings)


def test_deploys_onto_an_existing_two_node_cluster_and_serves_from_both(
    two_node_cluster: tuple[str, Settings], deployed: DeploymentRecord
) -> None:
    import ray

    from tasks.rayserve.cluster import read_local_cluster

    _, settings = two_node_cluster
    record = deployed
    assert read_local_cluster(settings) is None  # nodewise started no Ray of its own
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2
    replicas = serve_replicas(record.app_name)
    assert [r["state"] for r in replicas] == ["RUNNING", "RUNNING"]
    assert {r["node_id"] for r in replicas} == nodes  # one replica on each node
    for _ in range(20):
        answer = httpx.post(f"{record.endpoint}/invocations", json={"inputs": np.zeros((1, 64)).tolist()}, timeout=30)
        assert answer.status_code == 200, answer.text


def test_a_lost_node_leaves_its_replica_unschedulable_and_the_watchdog_reports_it(
    two_node_cluster: tuple[str, Settings], deployed: DeploymentRecord
) -> None:
    """SIGKILL of the second node's raylet: its replica cannot be placed again (another actor
    holds the head's spare CPU), so the watchdog reports the app degraded with the cause and
    restarts nothing."""
    import ray

    from tasks.watchdog.engine import watch_once

    _, settings = two_node_cluster
    record = deployed
    # Both replicas placed, one per node, before a node is lost (the other test may not have run).
    wait_until(lambda: len(running_replicas(record.app_name)) == 2, 120, "2 replicas running")
    head = next(n for n in ray.nodes() if "node:__internal_head__" in n["Resources"])
    [worker] = [n for n in ray.nodes() if n["Alive"] and n["NodeID"] != head["NodeID"]]
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0.5)
    class Holder:
        def ready(self) -> bool:
            return True

    on_head = NodeAffinitySchedulingStrategy(node_id=head["NodeID"], soft=False)
    holder = Holder.options(scheduling_strategy=on_head).remote()  # the head's last half CPU
    assert ray.get(holder.ready.remote(), timeout=60)
    marker = f"--node_id={worker['NodeID']}"
    [raylet] = [
        p
        for p in psutil.process_iter(["cmdline"])
        if p.info["cmdline"] and p.info["cmdline"][0].endswith("raylet") and marker in p.info["cmdline"]
    ]
    raylet.kill()

    degraded = []
    # Reported, not acted on: the app degraded, and Serve replacing the lost replica by itself (counted).
    reports = {"nodewise.deployment.degraded", "nodewise.replica.replaced"}

    def reported_dead() -> bool:
        actions = watch_once(settings)
        assert all(a.event in reports for a in actions), actions  # nothing restarted
        degraded.extend(a for a in actions if a.event == "nodewise.deployment.degraded")
        return any("dead nodes: " in a.cause for a in degraded)

    wait_until(reported_dead, 120, "the watchdog reports the dead node", every_s=1, seen=lambda: degraded)
    cause = degraded[-1].cause
    assert cause.startswith("1 of 2 replicas running"), cause
    assert f"({worker['NodeID'][:8]})" in cause
    again = watch_once(settings)  # an unchanged cause is not reported again
    assert all(a.event in reports for a in again), again
    assert all(a.cause != cause for a in again if a.event == "nodewise.deployment.degraded"), again
    print(f"degraded: {cause}")
    answer = httpx.post(f"{record.endpoint}/invocations", json={"inputs": np.zeros((1, 64)).tolist()}, timeout=30)
    assert answer.status_code == 200  # the surviving replica serves
