"""The watchdog on Kubernetes: the pods of what ``nodewise render --apply`` put there.

A RayService's sick pod (failed, or crash-looping) is deleted alone: its controller starts a
new one while the other replicas serve (replica-level). A sick pod of an MPIJob or a
LeaderWorkerSet restarts the whole rank group (tasks/k8s/apply.py ``restart_group``), since the
other ranks cannot go on without it. Pods that cannot be scheduled, or whose image cannot be
pulled, are reported as degraded: a restart would not help. Budgets and events are the local
watchdog's (tasks/watchdog/engine.py).
"""

from __future__ import annotations

from typing import Any

from tasks.k8s.render import FRONT, LABEL, ROLE

CRASHING = {"CrashLoopBackOff", "Error", "RunContainerError", "CreateContainerError"}
NOT_FIXED_BY_RESTART = {"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "CreateContainerConfigError"}


def workload(objects: list[dict[str, Any]]) -> dict[str, Any]:  # never the front's Deployment
    """The RayService, MPIJob or LeaderWorkerSet among the rendered objects."""
    return next(o for o in objects if o["kind"] in ("RayService", "MPIJob", "LeaderWorkerSet"))


def pod_state(pod: dict[str, Any]) -> tuple[str, str]:
    """("ok" | "sick" | "stuck" | "starting", why) for one pod as the API returns it (a dict)."""
    name = pod["metadata"]["name"]
    status = pod.get("status") or {}
    phase = status.get("phase", "Pending")
    if phase == "Failed":
        return "sick", f"pod {name} failed ({status.get('reason') or status.get('message') or 'no reason given'})"
    for container in status.get("container_statuses") or status.get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason")
        if reason in NOT_FIXED_BY_RESTART:
            return "stuck", f"pod {name}: {reason} ({waiting.get('message') or container.get('image', '')})"
        if reason in CRASHING:
            restarts = container.get("restart_count", container.get("restartCount", 0))
            return "sick", f"pod {name}: container {container.get('name')} {reason} after {restarts} restarts"
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return "stuck", f"pod {name} cannot be scheduled: {condition.get('message') or condition.get('reason')}"
    return ("ok", "") if phase in ("Running", "Succeeded") else ("starting", f"pod {name} is {phase}")


def list_pods(api: Any, namespace: str, app: str) -> list[dict[str, Any]]:
    """The pods of ``app``'s workload; not its front's (a Deployment of its own restarts it, and a
    group restart must leave it holding requests)."""
    from kubernetes import client

    core = client.CoreV1Api(api)
    listed = core.list_namespaced_pod(namespace, label_selector=f"{LABEL}={app},{ROLE}!={FRONT}").items
    pods = [api.sanitize_for_serialization(p) for p in listed]
    return [p for p in pods if _of_workload(p["metadata"].get("labels") or {}, app)]  # the selector, checked


def _of_workload(labels: dict[str, str], app: str) -> bool:
    return labels.get(LABEL) == app and labels.get(ROLE) != FRONT


def diagnose(kind: str, pods: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, str | None, str | None]:
    """(the pod to act on, why, degraded cause) for a workload's pods (plain function)."""
    states = [(p, *pod_state(p)) for p in pods]
    stuck = [why for _, state, why in states if state == "stuck"]
    sick = [(p, why) for p, state, why in states if state == "sick"]
    degraded = "; ".join(stuck) or (None if pods else f"no pods of this {kind} found (is its operator running?)")
    if sick:
        return sick[0][0], sick[0][1], degraded
    return None, None, degraded
