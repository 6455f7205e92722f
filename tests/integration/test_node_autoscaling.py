"""Node autoscaling of the local instance: Ray's own autoscaler adds a Ray node when the replicas
Serve wants do not fit, and removes it once idle.

The nodes are real Ray nodes (raylet, object store, workers) that Ray's fake multi-node provider
starts on this machine, the provider Ray's own autoscaler tests use: a real provider of machines
cannot run here. Everything above it (Serve's autoscaler asking for a replica, Ray's autoscaler
reading the pending demand and launching, idle removal) is Ray's real code."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from nodewise.core.settings import Settings
from nodewise.demo_models import digits_split
from nodewise.ops.status import deployment_status
from testkit import LoadClient, serve_replicas, wait_until
from testkit.flows import deploy_model

from .conftest import module_settings, registered_with_serve_tags


@pytest.fixture(scope="module")
def settings(prefect_harness: None) -> Iterator[Settings]:
    # A head of one CPU holds two replicas (half a CPU each, the floor); a third needs a node the
    # autoscaler adds. The added node offers 2 CPUs: the plan's ceiling is a replica per core of
    # the inventory (1 + 2), the node it may add counted.
    yield from module_settings(
        ray={"num_cpus": 1, "max_added_nodes": 1, "added_node_cpus": 2, "idle_node_timeout_s": 5},
        serve={"replicas": None},
    )


def test_a_load_step_adds_a_ray_node_for_the_replica_that_does_not_fit_and_idle_removes_it(
    settings: Settings,
) -> None:
    name, version = registered_with_serve_tags(
        settings, "digits-nodes", min_replicas=2, max_replicas=3, target_ongoing_requests=1,
        upscale_delay_s=0, downscale_delay_s=3,
    )  # fmt: skip
    record = deploy_model(f"models:/{name}/{version}", settings=settings)
    assert record.spec["max_replicas"] == 3  # the inventory counts the node that may be added

    def nodes() -> dict:
        return deployment_status(settings)["nodes"]

    def replicas() -> list[dict]:
        return serve_replicas(record.app_name)

    def state(replica: dict) -> str:
        return replica["state"]

    def wait_for(what: str, done, timeout_s: float = 120) -> float:
        started = time.monotonic()
        wait_until(done, timeout_s, what, seen=lambda: f"replicas {[state(r) for r in replicas()]}, nodes {nodes()}")
        return time.monotonic() - started

    before = nodes()
    assert [n["head"] for n in before["alive"]] == [True]
    assert before["max_added_nodes"] == 1
    head = before["alive"][0]["node_id"]
    _, _, x_test, _ = digits_split()
    body = json.dumps({"inputs": x_test[:1].tolist()}).encode()
    with LoadClient(f"{record.endpoint}/invocations", body, workers=6) as load:
        up_s = wait_for("3 replicas running", lambda: [state(r) for r in replicas()].count("RUNNING") == 3)
        during = nodes()
        assert len(during["alive"]) == 2
        added = {n["node_id"] for n in during["alive"] if not n["head"]}
        assert {r["node_id"] for r in replicas()} == {head} | added  # the third replica is on the new node
        time.sleep(2)
    down_s = wait_for(
        "back to 2 replicas and the head alone", lambda: len(replicas()) == 2 and len(nodes()["alive"]) == 1
    )
    after = nodes()
    assert {n["node_id"] for n in after["removed"]} == added
    print(f"node autoscaling: 3 replicas on 2 nodes {up_s:.1f} s after the step; node removed {down_s:.1f} s after it")
    assert load.failures == []
    assert load.ok > 50
    assert httpx.post(f"{record.endpoint}/invocations", content=body, timeout=30).status_code == 200
