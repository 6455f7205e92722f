"""The watchdog's Kubernetes actions against the in-process API emulator (tests/kube_emulator.py).

No controller runs there: the tests create the pods a controller would, with the statuses a
kubelet would report, and check what the watchdog deletes. A crash-looping RayService pod is
deleted alone; a failed rank of a LeaderWorkerSet takes its whole group; an unschedulable pod is
reported once; the budget ends in a failed deployment left alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from nodewise.core.settings import Settings
from tasks.k8s.deploy import Rendered
from tasks.k8s.render import LABEL
from tasks.records import save_record
from tests.kube_emulator import client_for, kube_emulator, write_kubeconfig
from tests.unit.test_k8s_render import gpu_nodes, multi_node, serve_manifests


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[object, Settings]]:
    with kube_emulator() as url:
        monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "kubeconfig", url)))
        settings = Settings(state_dir=tmp_path / "state", watchdog={"backoff_s": 0, "max_restarts": 2})
        yield client_for(url), settings


def applied(settings: Settings, api: object, objects: list[dict], plan: object) -> str:
    from tasks.k8s.apply import apply

    apply(objects, api)
    rendered = Rendered(
        objects=objects, plan=plan, warnings=[], model_uri="models:/m/1", model_name="m", model_version="1"
    )
    return save_record(settings.state.k8s_records, rendered.record()).app_name


def add_pod(api: object, name: str, app: str, status: dict, labels: dict[str, str] | None = None) -> None:
    from kubernetes import client

    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "serving", "labels": labels or {LABEL: app}},
        "spec": {"containers": [{"name": "c", "image": "nodewise:latest"}]},
        "status": status,
    }
    client.CoreV1Api(api).create_namespaced_pod("serving", body)


def pods(api: object) -> list[str]:
    from kubernetes import client

    return sorted(p.metadata.name for p in client.CoreV1Api(api).list_namespaced_pod("serving").items)


RUNNING = {"phase": "Running"}
FAILED = {"phase": "Failed", "reason": "Error"}
CRASHING = {
    "phase": "Running",
    "containerStatuses": [
        {
            "name": "ray-worker",
            "image": "nodewise:latest",
            "imageID": "",
            "ready": False,
            "restartCount": 4,
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
        }
    ],
}
UNSCHEDULABLE = {
    "phase": "Pending",
    "conditions": [
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu.",
        }
    ],
}


def test_a_crash_looping_ray_pod_is_deleted_alone(cluster: tuple[object, Settings]) -> None:
    from tasks.watchdog.engine import watch_once

    api, settings = cluster
    objects, _, plan = serve_manifests(5, gpu_nodes(2, 4, 80), replicas=4)
    app = applied(settings, api, objects, plan)
    ray_service = next(o for o in objects if o["kind"] == "RayService")["metadata"]["name"]
    add_pod(api, "worker-a", ray_service, RUNNING)
    add_pod(api, "worker-b", ray_service, CRASHING)
    [action] = watch_once(settings)
    assert (action.event, action.app, action.target) == ("nodewise.replica.restarted", app, "pod worker-b")
    assert action.cause == "pod worker-b: container ray-worker CrashLoopBackOff after 4 restarts"
    assert pods(api) == ["worker-a"]
    assert watch_once(settings) == []  # healthy now


def test_a_failed_rank_restarts_the_whole_group(cluster: tuple[object, Settings]) -> None:
    from tasks.watchdog.engine import watch_once

    api, settings = cluster
    objects, plan = multi_node("lws")
    app = applied(settings, api, objects, plan)
    add_pod(api, "llama-70b-0", "llama-70b", RUNNING)
    add_pod(api, "llama-70b-0-1", "llama-70b", FAILED)
    add_pod(api, "someone-else", "other", FAILED)  # not ours: never touched
    front = next(o for o in objects if o["kind"] == "Deployment")["spec"]["template"]["metadata"]["labels"]
    add_pod(api, "llama-70b-front-x", "llama-70b", CRASHING, front)  # its Deployment restarts it, not the group
    [action] = watch_once(settings)
    assert (action.event, action.app) == ("nodewise.cluster.restarted", app)
    assert action.cause == "pod llama-70b-0-1 failed (Error)"
    assert action.outcome == "deleted 2 pod(s) of LeaderWorkerSet serving/llama-70b together"
    assert pods(api) == ["llama-70b-front-x", "someone-else"]


def test_unschedulable_pods_are_degraded_once_and_the_budget_ends_in_failed(cluster: tuple[object, Settings]) -> None:
    from tasks.watchdog.engine import load_watch, watch_once

    api, settings = cluster
    objects, plan = multi_node("lws")
    app = applied(settings, api, objects, plan)
    add_pod(api, "llama-70b-0", "llama-70b", UNSCHEDULABLE)
    [degraded] = watch_once(settings)
    assert degraded.event == "nodewise.deployment.degraded"
    assert (
        degraded.cause == "pod llama-70b-0 cannot be scheduled: 0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
    )
    assert watch_once(settings) == []  # reported once
    events = []
    for _ in range(3):  # a rank that fails after every restart
        add_pod(api, f"llama-70b-0-{len(events)}", "llama-70b", FAILED)
        events += [a.event for a in watch_once(settings)]
    # The first group restart also took the unschedulable pod away: the degradation ended with it.
    restarted, recovered, failed = (
        "nodewise.cluster.restarted",
        "nodewise.deployment.recovered",
        "nodewise.deployment.failed",
    )
    assert events == [restarted, recovered, restarted, failed]
    assert load_watch(settings)[0][app].failed.endswith("after 2 restarts in 600 s")
    add_pod(api, "llama-70b-0-x", "llama-70b", FAILED)
    assert watch_once(settings) == []  # left alone
