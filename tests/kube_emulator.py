"""An in-process Kubernetes API for contract tests: kmock's KubernetesEmulator served over HTTP on
127.0.0.1, in a thread of its own, so that the real (synchronous) ``kubernetes`` client talks to
it. It stores objects and answers create/get/list/patch/delete with 409 and 404; it has no
schemas, admission or controllers (nothing becomes ready, no pod is created for a workload)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

VERBS = ["create", "get", "list", "patch", "update", "delete", "watch"]
RESOURCES = {  # "group/version/plural" -> (kind, singular, namespaced)
    "v1/pods": ("Pod", "pod", True),
    "v1/services": ("Service", "service", True),
    "v1/configmaps": ("ConfigMap", "configmap", True),
    "v1/serviceaccounts": ("ServiceAccount", "serviceaccount", True),
    "v1/nodes": ("Node", "node", False),
    "apps/v1/deployments": ("Deployment", "deployment", True),
    "rbac.authorization.k8s.io/v1/roles": ("Role", "role", True),
    "rbac.authorization.k8s.io/v1/rolebindings": ("RoleBinding", "rolebinding", True),
    "ray.io/v1/rayservices": ("RayService", "rayservice", True),
    "kubeflow.org/v2beta1/mpijobs": ("MPIJob", "mpijob", True),
    "leaderworkerset.x-k8s.io/v1/leaderworkersets": ("LeaderWorkerSet", "leaderworkerset", True),
    "monitoring.coreos.com/v1/podmonitors": ("PodMonitor", "podmonitor", True),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def kube_emulator(without: tuple[str, ...] = ()) -> Iterator[str]:
    """Run the emulator; yield its URL. ``without``: resource keys it does not serve (a missing CRD)."""
    import kmock

    port = _free_port()
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def serve() -> None:
        state["stop"] = asyncio.Event()
        state["loop"] = asyncio.get_running_loop()
        async with kmock.KubernetesEmulator() as k8s, kmock.Server(k8s, host="127.0.0.1", port=port):
            for key, (kind, singular, namespaced) in RESOURCES.items():
                if key not in without:
                    k8s.resources[key] = kmock.ResourceInfo(
                        kind=kind, singular=singular, namespaced=namespaced, verbs=VERBS
                    )
            ready.set()
            await state["stop"].wait()

    thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
    thread.start()
    assert ready.wait(30), "the Kubernetes emulator did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(10)


def client_for(url: str) -> Any:
    from kubernetes import client

    config = client.Configuration()
    config.host = url
    return client.ApiClient(config)


def write_kubeconfig(path: Path, url: str) -> Path:
    """A kubeconfig whose current context is the emulator (no credentials: it asks for none)."""
    import yaml

    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "emulator", "cluster": {"server": url}}],
                "users": [{"name": "tester", "user": {}}],
                "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester"}}],
                "current-context": "emulator",
            }
        )
    )
    return path
