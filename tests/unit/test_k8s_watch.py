"""How the watchdog reads a workload's pods on Kubernetes (plain functions of what the API returned)."""

from tasks.k8s.watch import diagnose, pod_state


def pod(name: str, **status: object) -> dict:
    return {"metadata": {"name": name}, "status": status}


def waiting(reason: str) -> list[dict]:
    return [{"name": "rank", "restartCount": 2, "state": {"waiting": {"reason": reason, "message": "pull failed"}}}]


def test_each_pod_state_is_named() -> None:
    assert pod_state(pod("a", phase="Running")) == ("ok", "")
    assert pod_state(pod("b", phase="Pending")) == ("starting", "pod b is Pending")
    assert pod_state(pod("c", phase="Failed", reason="OOMKilled")) == ("sick", "pod c failed (OOMKilled)")
    assert pod_state(pod("d", phase="Running", containerStatuses=waiting("CrashLoopBackOff"))) == (
        "sick",
        "pod d: container rank CrashLoopBackOff after 2 restarts",
    )
    # A restart cannot pull an image that is not there: reported, not restarted.
    assert pod_state(pod("e", phase="Pending", containerStatuses=waiting("ImagePullBackOff"))) == (
        "stuck",
        "pod e: ImagePullBackOff (pull failed)",
    )


def test_diagnose_acts_on_the_first_sick_pod_and_reports_stuck_ones() -> None:
    pods = [
        pod("a", phase="Running"),
        pod("b", phase="Failed", reason="Error"),
        pod("c", phase="Pending", containerStatuses=waiting("ErrImagePull")),
    ]
    target, cause, degraded = diagnose("MPIJob", pods)
    assert (target["metadata"]["name"], cause) == ("b", "pod b failed (Error)")
    assert degraded == "pod c: ErrImagePull (pull failed)"
    assert diagnose("MPIJob", [pod("a", phase="Running")]) == (None, None, None)
    assert diagnose("LeaderWorkerSet", [])[2] == "no pods of this LeaderWorkerSet found (is its operator running?)"
