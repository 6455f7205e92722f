"""Contract tests of nodewise's Kubernetes client code: the real ``kubernetes`` client against an
in-process API emulator (tests/kube_emulator.py). No cluster was used: the emulator stores and
serves objects like an API server but runs no controller, admission or schema."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodewise.core.errors import DeployFailed, KubernetesUnavailable
from tasks.k8s.apply import apply, delete, restart_group, restart_pod, wait_ready
from tasks.kubeapi import api_client
from tests.kube_emulator import client_for, kube_emulator, write_kubeconfig
from tests.unit.test_k8s_render import multi_node

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def api() -> Iterator[object]:
    with kube_emulator() as url:
        yield client_for(url)


def pod(name: str, labels: dict[str, str]) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "serving", "labels": labels},
        "spec": {"containers": [{"name": "c", "image": "nodewise:latest"}]},
    }


def pods(api: object) -> list[str]:
    from kubernetes import client

    return sorted(p.metadata.name for p in client.CoreV1Api(api).list_namespaced_pod("serving").items)


def test_apply_creates_then_patches_and_delete_is_idempotent(api: object) -> None:
    from kubernetes import dynamic

    objects, _ = multi_node("mpijob")
    first = apply(objects, api)
    assert first == [f"created {o['kind']} serving/{o['metadata']['name']}" for o in objects]
    changed = json.loads(json.dumps(objects))
    job = next(o for o in changed if o["kind"] == "MPIJob")
    job["spec"]["mpiReplicaSpecs"]["Worker"]["replicas"] = 3
    assert all(line.startswith("patched ") for line in apply(changed, api))
    live = dynamic.DynamicClient(api).resources.get(api_version="kubeflow.org/v2beta1", kind="MPIJob")
    assert live.get(name=job["metadata"]["name"], namespace="serving").spec.mpiReplicaSpecs.Worker.replicas == 3
    assert all(line.startswith("deleted ") for line in delete(objects, api))
    assert all(line.endswith("was already gone") for line in delete(objects, api))


def test_a_cluster_without_the_operator_is_a_clear_error() -> None:
    objects, _ = multi_node("mpijob")
    missing = r"does not serve MPIJob \(kubeflow.org/v2beta1\): install the Kubeflow MPI Operator"
    with (
        kube_emulator(without=("kubeflow.org/v2beta1/mpijobs",)) as url,
        pytest.raises(KubernetesUnavailable, match=missing),
    ):
        apply(objects, client_for(url))


def test_a_cluster_without_the_prometheus_operator_deploys_without_the_pod_monitors() -> None:
    objects, _ = multi_node("mpijob")
    monitors = [o["metadata"]["name"] for o in objects if o["kind"] == "PodMonitor"]  # rank 0's and the front's
    assert len(monitors) == 2
    skipped = [
        f"skipped PodMonitor serving/{name}: the cluster does not serve PodMonitor "
        "(monitoring.coreos.com/v1): install the Prometheus Operator (https://prometheus-operator.dev)"
        for name in monitors
    ]
    with kube_emulator(without=("monitoring.coreos.com/v1/podmonitors",)) as url:
        api = client_for(url)
        done = apply(objects, api)
        assert done[-2:] == skipped
        assert all(line.startswith("created ") for line in done[:-2])
        gone = delete(objects, api)
        assert gone[:2] == skipped[::-1]
        assert all(line.startswith("deleted ") for line in gone[2:])


def test_waiting_names_the_workload_and_its_status_then_sees_it_ready(api: object) -> None:
    from kubernetes import dynamic

    objects, _ = multi_node("lws")
    apply(objects, api)
    with pytest.raises(DeployFailed, match=r"LeaderWorkerSet serving/llama-70b not ready after 1 s \(no status yet\)"):
        wait_ready(objects, api, timeout_s=1, poll_s=0.2)
    lws = dynamic.DynamicClient(api).resources.get(api_version="leaderworkerset.x-k8s.io/v1", kind="LeaderWorkerSet")
    status = {"status": {"conditions": [{"type": "Available", "status": "True"}]}}
    lws.patch(body=status, name="llama-70b", namespace="serving", content_type="application/merge-patch+json")
    # the group is ready; its front (a Deployment of its own) is waited for too
    with pytest.raises(DeployFailed, match=r"Deployment serving/llama-70b-front not ready after 1 s"):
        wait_ready(objects, api, timeout_s=1, poll_s=0.2)
    front = dynamic.DynamicClient(api).resources.get(api_version="apps/v1", kind="Deployment")
    front.patch(body=status, name="llama-70b-front", namespace="serving", content_type="application/merge-patch+json")
    wait_ready(objects, api, timeout_s=5, poll_s=0.2)  # ready: returns


def test_a_group_restart_deletes_every_pod_of_the_group_and_nothing_else(api: object) -> None:
    """Not the group's front either: it holds requests while the group comes back."""
    from kubernetes import client

    objects, _ = multi_node("lws")
    apply(objects, api)
    core = client.CoreV1Api(api)
    for name, group in [("llama-70b-0", "llama-70b"), ("llama-70b-0-1", "llama-70b"), ("other-0", "other")]:
        core.create_namespaced_pod("serving", pod(name, {"nodewise.dev/app": group}))
    front = next(o for o in objects if o["kind"] == "Deployment")["spec"]["template"]["metadata"]["labels"]
    core.create_namespaced_pod("serving", pod("llama-70b-front-7d9c-x2v4q", front))
    lws = next(o for o in objects if o["kind"] == "LeaderWorkerSet")
    assert restart_group(api, lws) == ["deleted 2 pod(s) of LeaderWorkerSet serving/llama-70b together"]
    assert pods(api) == ["llama-70b-front-7d9c-x2v4q", "other-0"]


def test_an_mpijob_restart_recreates_the_job(api: object) -> None:
    from kubernetes import dynamic

    objects, _ = multi_node("mpijob")
    apply(objects, api)
    job = next(o for o in objects if o["kind"] == "MPIJob")
    assert restart_group(api, job) == ["deleted and recreated MPIJob serving/llama-70b"]
    live = dynamic.DynamicClient(api).resources.get(api_version="kubeflow.org/v2beta1", kind="MPIJob")
    assert live.get(name="llama-70b", namespace="serving").spec.slotsPerWorker == job["spec"]["slotsPerWorker"]


def test_a_replica_restart_deletes_one_pod(api: object) -> None:
    from kubernetes import client

    core = client.CoreV1Api(api)
    for name in ("worker-a", "worker-b"):
        core.create_namespaced_pod("serving", pod(name, {"ray.io/group": "replicas"}))
    assert restart_pod(api, "serving", "worker-a") == "deleted pod serving/worker-a"
    assert pods(api) == ["worker-b"]
    assert restart_pod(api, "serving", "worker-a") == "pod serving/worker-a was already gone"


def test_the_inventory_reads_gpu_feature_discovery_labels_through_the_api(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubernetes import client

    from tasks.planning.inventory_sources import read_inventory

    with kube_emulator() as url:
        core = client.CoreV1Api(client_for(url))
        for node in json.loads((ROOT / "tests/fixtures/k8s_nodes.json").read_text()):
            core.create_node({"apiVersion": "v1", "kind": "Node", **node})
        monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "config", url)))
        inventory = read_inventory("k8s")
    assert inventory.source == f"k8s:{url}"
    assert [n.name for n in inventory.nodes] == ["gpu-a", "gpu-shared", "cpu-a"]
    assert len(inventory.nodes[0].gpus) == 8


def test_no_configuration_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubernetesUnavailable, match="no Kubernetes configuration found"):
        api_client()
