"""Ray Serve across real network hosts: one node dies, only its replica is lost, the others serve.

A Ray cluster whose head runs on this machine's address on a bridge and whose two workers run in
two namespace hosts (testkit/hosts.py), each with a node address of its own, token auth on. nodewise
deploys onto it with `nodewise deploy --inventory ray:ADDRESS` (a CLI process: a driver on the
head's host, as a user runs it), three replicas spread over the three nodes. Then one worker host
dies (its processes killed, off the network) under a steady client: requests keep being answered
by the surviving replicas, none fails (HAProxy finds the silent host dead and sends the requests it
had there to another replica: tasks/rayserve/cluster.py, DEAD_PEER_S), and
Serve recreates the lost replica on a surviving node with room (the head or the other worker: Serve
picks, and either is right). The head notices a dead node through Ray's health checks; the test
cluster shortens them (RAY_health_check_*, the knob the README names for users) so that takes
seconds, not Ray's default of about a minute.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nodewise.core.runtime import serve_environment
from tasks.rayserve.cluster import write_haproxy_launcher
from testkit import LoadClient, wait_until
from testkit import hosts as netns

from .conftest import _SESSION_RAY_TOKEN, free_port_block, make_settings

pytestmark = pytest.mark.multihost
NODEWISE = str(Path(sys.executable).with_name("nodewise"))
RAY = str(Path(sys.executable).with_name("ray"))

# Serve's view of the app, read by a driver process of its own (this test process is a driver of
# nodewise's one-machine Rays, whose node address is 127.0.0.1: it cannot join this cluster).
_DETAILS = r"""
import json, sys, ray
from ray.serve.context import _get_global_client
ray.init(address=sys.argv[1], namespace="nodewise", logging_level="ERROR", log_to_driver=False)
details = _get_global_client().get_serve_details()["applications"][sys.argv[2]]["deployments"]["ModelServer"]
nodes = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
print(json.dumps({"replicas": [{"state": str(r["state"]), "node": r.get("node_ip")} for r in details["replicas"]],
                  "nodes": sorted(nodes.values())}))
"""


# Ray's GCS marks a node dead after `failure_threshold` health checks in a row miss their timeout;
# the defaults (every 3 s, 10 s timeout, 5 misses) take about a minute for a host off the network.
_FAST_NODE_DEATH = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "2000",
    "RAY_health_check_failure_threshold": "3",
}


class Cluster:
    def __init__(self, address: str, env: dict[str, str], lan: netns.Hosts) -> None:
        self.address, self.env, self.lan = address, env, lan

    def details(self, app: str) -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, "-c", _DETAILS, self.address, app],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if not netns.available():
        pytest.skip(netns.why_unavailable())
    temp = Path(tempfile.mkdtemp(prefix="nwmh-", dir="/tmp"))
    token = temp / "token"
    token.write_text(_SESSION_RAY_TOKEN)
    port = free_port_block(5)
    like = make_settings(serve={"replicas": 3})
    env = {
        # A cluster other machines join: not the tests' one-machine switch
        **{k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"},
        **serve_environment(like),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    # HAProxy through nodewise's launcher, as on its local instance (its rules: retries, a dead
    # replica host found by TCP keepalive); every node here shares this machine's files
    launcher = write_haproxy_launcher(like)
    assert launcher is not None
    env["RAY_SERVE_HAPROXY_BINARY_PATH"] = str(launcher)
    with netns.hosts(2) as lan:
        address = f"{lan.this_host}:{port}"
        try:
            head_temp = temp / "head"
            subprocess.run(
                [RAY, "start", "--head", f"--port={port}", f"--node-ip-address={lan.this_host}", "--num-cpus=2",
                 "--include-dashboard=false", f"--temp-dir={head_temp}", "--disable-usage-stats",
                 f"--ray-client-server-port={port + 1}", f"--dashboard-agent-listen-port={port + 2}"],
                env={**env, **_FAST_NODE_DEATH}, check=True, capture_output=True, timeout=180,
            )  # fmt: skip
            for i, host in enumerate(lan.hosts):
                node_temp = temp / f"node{i}"
                done = host.run(
                    [RAY, "start", f"--address={address}", f"--node-ip-address={host.address}", "--num-cpus=1",
                     f"--temp-dir={node_temp}", "--disable-usage-stats"],
                    env=env, timeout=180,
                )  # fmt: skip
                assert done.returncode == 0, done.stderr[-3000:]
            yield Cluster(address, env, lan)
        finally:  # every process of these nodes names its temp folder (`ray stop` would stop every Ray here)
            _kill_marked(str(temp))
            _kill_marked(str(like.state.haproxy))
            shutil.rmtree(temp, ignore_errors=True)
            shutil.rmtree(like.state_path, ignore_errors=True)


def _kill_marked(marker: str) -> None:
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        if marker in " ".join(proc.info["cmdline"] or []):
            proc.kill()


def test_a_dead_node_loses_only_its_replica_and_serve_recreates_it_where_there_is_room(
    cluster: Cluster, tmp_path: Path
) -> None:
    from nodewise.core.settings import Settings
    from nodewise.demo_models import register_demo_model

    state = tmp_path / "state"
    env = {
        **{k: v for k, v in cluster.env.items() if not k.startswith("NODEWISE_")},
        "NODEWISE_STATE_DIR": str(state),
        "NODEWISE_RAY__ADDRESS": cluster.address,
        "NODEWISE_SERVE__REPLICAS": "3",
        "NODEWISE_SERVE__HOST": "0.0.0.0",
        "NODEWISE_SERVE__PORT": str(free_port_block(1)),
        "NODEWISE_MLFLOW__TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"],  # where the model is registered below
    }
    model = register_demo_model(str(Settings(state_dir=state).state.artifacts))
    deployed = subprocess.run(
        [NODEWISE, "deploy", f"models:/{model.name}@champion", "--inventory", f"ray:{cluster.address}"],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    shown = subprocess.run([NODEWISE, "status", "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert shown.stdout.startswith("{"), shown.stdout[:2000]  # the JSON alone: what a script parses
    status = json.loads(shown.stdout)
    [row] = status["deployments"]
    before = cluster.details(row["app"])
    assert sorted(r["node"] for r in row["replica_nodes"]) == sorted(r["node"] for r in before["replicas"])
    head, w0, w1 = cluster.lan.this_host, *cluster.lan.addresses
    assert before["nodes"] == sorted([head, w0, w1])
    assert sorted(r["node"] for r in before["replicas"]) == sorted([head, w0, w1])  # one replica per host

    body = json.dumps({"inputs": np.zeros((1, 64)).tolist()}).encode()
    seen: dict = {}

    def replaced() -> bool:
        seen.update(cluster.details(row["app"]))
        running = [r for r in seen["replicas"] if r["state"].endswith("RUNNING")]
        return len(running) == 3 and w1 not in seen["nodes"]

    with LoadClient(f"{row['endpoint']}/invocations", body, workers=2) as load:
        wait_until(lambda: load.ok >= 5, 60, "the steady client served before the fault", every_s=0.2)
        fault_at = time.time()
        cluster.lan.kill_host(cluster.lan[1])  # worker w1 dies: its raylet, its replica, everything on it
        wait_until(replaced, 180, "3 replicas running without the dead host", every_s=2, seen=lambda: seen)
        healthy_after_s = time.time() - fault_at
        served = load.ok
        wait_until(lambda: load.ok >= served + 5, 60, "the steady client served after the repair", every_s=0.2)
    after = seen
    window = load.outcomes_between(fault_at)
    failed = [o.outcome for o in window if not o.ok]
    slowest = max(o.latency_s for o in window)
    why = [(o.outcome, o.detail[:80], round(o.latency_s, 1)) for o in window if not o.ok]
    print(
        f"serve node loss: {len(failed)} of {len(window)} failed; 3 replicas again after {healthy_after_s:.1f} s; "
        f"slowest answer {slowest:.1f} s; failed: {why}"
    )
    assert w1 not in after["nodes"]
    survivors = [r["node"] for r in after["replicas"] if r["state"].endswith("RUNNING")]
    assert len(survivors) == 3, after  # the lost replica recreated ...
    assert set(survivors) <= {head, w0}, after  # ... on a node that is alive, wherever Serve found room
    assert len(window) > 20
    assert failed == [], why  # the requests the dead host had were sent to another replica
