"""Rendered manifests through the Kubernetes API (the official ``kubernetes`` client): apply,
delete, wait until ready, and the watchdog's actions there.

Apply is idempotent: create, and on 409 (it exists) a merge patch. Delete treats 404 as done.
A kind in ``OPTIONAL`` (the Prometheus Operator's PodMonitor) is skipped, with a line saying so,
where the cluster does not serve it: monitoring is not worth a failed deploy.
The watchdog's actions: a replica-level restart deletes one pod (its controller starts a new
one); a whole-group restart recreates every rank together: a LeaderWorkerSet's group pods are
deleted at once (it recreates the group), an MPIJob is deleted and created again (its launcher
is a run-to-completion Job that cannot be restarted in place).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from nodewise.core.errors import DeployFailed, InvalidInput, KubernetesUnavailable

OPERATORS = {
    "RayService": "KubeRay (https://docs.ray.io/en/latest/cluster/kubernetes/getting-started.html)",
    "MPIJob": "the Kubeflow MPI Operator (https://github.com/kubeflow/mpi-operator)",
    "LeaderWorkerSet": "LeaderWorkerSet (https://lws.sigs.k8s.io/docs/installation/)",
}
# Kinds a deployment works without: what to install to have them.
OPTIONAL = {"PodMonitor": "the Prometheus Operator (https://prometheus-operator.dev)"}


def _resource(api: Any, manifest: dict[str, Any]) -> Any:
    from kubernetes import dynamic
    from kubernetes.dynamic.exceptions import ResourceNotFoundError

    kind, version = manifest["kind"], manifest["apiVersion"]
    try:
        return dynamic.DynamicClient(api).resources.get(api_version=version, kind=kind)
    except ResourceNotFoundError as e:
        install = OPERATORS.get(kind) or OPTIONAL.get(kind, "the API that serves it")
        raise KubernetesUnavailable(f"the cluster does not serve {kind} ({version}): install {install}") from e


def _optional_resource(api: Any, manifest: dict[str, Any]) -> tuple[Any, str]:
    """``_resource``, or None and why for an optional kind the cluster does not serve."""
    try:
        return _resource(api, manifest), ""
    except KubernetesUnavailable as e:
        if manifest["kind"] not in OPTIONAL:
            raise
        return None, f"skipped {_where(manifest)}: {e}"


def _where(manifest: dict[str, Any]) -> str:
    meta = manifest["metadata"]
    return f"{manifest['kind']} {meta.get('namespace', '')}/{meta['name']}".replace(" /", " ")


def apply(objects: list[dict[str, Any]], api: Any) -> list[str]:
    """Create each object, or merge-patch it where it exists. Returns what was done, in order."""
    from kubernetes.dynamic.exceptions import ConflictError

    done = []
    for manifest in objects:
        resource, skipped = _optional_resource(api, manifest)
        if resource is None:
            done.append(skipped)
            continue
        namespace = manifest["metadata"].get("namespace")
        try:
            resource.create(body=manifest, namespace=namespace)
            done.append(f"created {_where(manifest)}")
        except ConflictError:
            resource.patch(
                body=manifest,
                name=manifest["metadata"]["name"],
                namespace=namespace,
                content_type="application/merge-patch+json",
            )
            done.append(f"patched {_where(manifest)}")
    return done


def delete(objects: list[dict[str, Any]], api: Any) -> list[str]:
    """Delete each object, last first; one already gone is fine."""
    from kubernetes.dynamic.exceptions import NotFoundError

    done = []
    for manifest in reversed(objects):
        resource, skipped = _optional_resource(api, manifest)
        if resource is None:
            done.append(skipped)
            continue
        try:
            resource.delete(name=manifest["metadata"]["name"], namespace=manifest["metadata"].get("namespace"))
            done.append(f"deleted {_where(manifest)}")
        except NotFoundError:
            done.append(f"{_where(manifest)} was already gone")
    return done


def readiness(manifest: dict[str, Any], live: dict[str, Any]) -> tuple[bool, str]:
    """Whether a workload reports ready, and what its status says (plain function of the object)."""
    status = live.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions", [])}
    kind = manifest["kind"]
    if kind == "RayService":
        ready = status.get("serviceStatus") == "Running" or conditions.get("Ready", {}).get("status") == "True"
    elif kind == "MPIJob":
        ready = conditions.get("Running", {}).get("status") == "True"
        if conditions.get("Failed", {}).get("status") == "True":
            raise DeployFailed(f"{_where(manifest)} failed: {conditions['Failed'].get('message', 'no message')}")
    elif kind in ("LeaderWorkerSet", "Deployment"):  # a Deployment: a DeepSpeed group's front
        ready = conditions.get("Available", {}).get("status") == "True"
    else:
        return True, "no readiness to wait for"
    said = "; ".join(f"{t}={c.get('status')}" for t, c in conditions.items()) or "no status yet"
    return ready, said


def wait_ready(objects: list[dict[str, Any]], api: Any, timeout_s: float, poll_s: float = 2.0) -> None:
    """Until every workload, and a DeepSpeed group's front (a Deployment), reports ready;
    DeployFailed naming it and its status after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    for manifest in objects:
        if manifest["kind"] not in (*OPERATORS, "Deployment"):
            continue
        resource = _resource(api, manifest)
        said = "not found"
        while True:
            live = resource.get(name=manifest["metadata"]["name"], namespace=manifest["metadata"]["namespace"])
            ready, said = readiness(manifest, live.to_dict())
            if ready:
                break
            if time.monotonic() >= deadline:
                raise DeployFailed(
                    f"{_where(manifest)} not ready after {timeout_s:.0f} s ({said}); see "
                    f"`kubectl describe {manifest['kind'].lower()} {manifest['metadata']['name']} "
                    f"-n {manifest['metadata']['namespace']}` and its pods' events"
                )
            time.sleep(poll_s)


# -- the watchdog's actions ------------------------------------------------------------------------
def restart_pod(api: Any, namespace: str, pod: str) -> str:
    """Replica-level: delete one pod; its controller starts a replacement, the others go on."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        client.CoreV1Api(api).delete_namespaced_pod(pod, namespace)
    except ApiException as e:
        if e.status != 404:
            raise
        return f"pod {namespace}/{pod} was already gone"
    return f"deleted pod {namespace}/{pod}"


def restart_group(api: Any, manifest: dict[str, Any]) -> list[str]:
    """Whole-group: every rank goes and comes back together (see the module's docstring)."""
    from kubernetes import client

    meta = manifest["metadata"]
    if manifest["kind"] == "MPIJob":
        from kubernetes.dynamic.exceptions import NotFoundError

        resource = _resource(api, manifest)
        with contextlib.suppress(NotFoundError):
            resource.delete(name=meta["name"], namespace=meta["namespace"], body={"propagationPolicy": "Foreground"})
        _wait_gone(resource, meta)
        resource.create(body=manifest, namespace=meta["namespace"])
        return [f"deleted and recreated {_where(manifest)}"]
    if manifest["kind"] != "LeaderWorkerSet":
        raise InvalidInput(f"{manifest['kind']} has no rank group to restart: restart its sick replica instead")
    from tasks.k8s.watch import list_pods  # the group's pods: never its front's, which holds meanwhile

    core = client.CoreV1Api(api)
    pods = list_pods(api, meta["namespace"], meta["name"])
    for pod in pods:
        core.delete_namespaced_pod(pod["metadata"]["name"], meta["namespace"])
    return [f"deleted {len(pods)} pod(s) of {_where(manifest)} together"]


def _wait_gone(resource: Any, meta: dict[str, Any], timeout_s: float = 120.0) -> None:
    from kubernetes.dynamic.exceptions import NotFoundError

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            resource.get(name=meta["name"], namespace=meta["namespace"])
        except NotFoundError:
            return
        time.sleep(1)
    raise DeployFailed(f"{meta['namespace']}/{meta['name']} still exists {timeout_s:.0f} s after its deletion")
