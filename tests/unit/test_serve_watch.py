"""What the watchdog makes of a Ray Serve app's replicas (plain functions of what it saw)."""

from nodewise.core.settings import WatchdogSettings
from tasks.rayserve.watch import AppView, ReplicaView, degraded_cause, pick_sick, replica_problem

WD = WatchdogSettings(min_requests=10, error_window_s=60)


def replica(rid: str = "a", state: str = "RUNNING", **vitals: object) -> ReplicaView:
    base = {"rss_bytes": 300 * 2**20, "memory_limit_bytes": 1024 * 2**20, "requests": 100, "errors": 0}
    base.update({"window_s": 60.0, "canary_s": 0.01, "canary_error": None})
    return ReplicaView(
        replica_id=rid, actor_name=f"SERVE_REPLICA::m#ModelServer#{rid}", state=state, pid=7, vitals=base | vitals
    )


def test_a_healthy_replica_has_no_problem() -> None:
    assert replica_problem(replica(), 0.5, WD) is None


def test_each_sickness_is_named() -> None:
    assert replica_problem(replica(canary_error="RuntimeError: boom"), 0.5, WD) == (
        "canary inference failed: RuntimeError: boom"
    )
    assert replica_problem(replica(rss_bytes=1500 * 2**20), 0.5, WD) == ("memory 1500 MiB is past its limit 1024 MiB")
    assert replica_problem(replica(requests=40, errors=20), 0.5, WD) == "20 of 40 requests failed in the last 60 s"
    late = ReplicaView(replica_id="b", actor_name="x", state="RUNNING", unreachable="canary inference took over 5 s")
    assert replica_problem(late, 0.5, WD) == "canary inference took over 5 s"


def test_an_error_rate_needs_enough_requests_and_reaches_the_threshold() -> None:
    assert replica_problem(replica(requests=9, errors=9), 0.5, WD) is None  # too few to judge
    assert replica_problem(replica(requests=100, errors=49), 0.5, WD) is None
    assert replica_problem(replica(requests=100, errors=10), 0.1, WD) is not None  # a per-model threshold


def test_one_replica_is_picked_per_pass() -> None:
    view = AppView(
        app="m",
        status="HEALTHY",
        target=3,
        replicas=[replica("a"), replica("b", canary_error="x"), replica("c", canary_error="y")],
    )
    sick, cause = pick_sick(view, 0.5, WD)
    assert (sick.replica_id, cause) == ("b", "canary inference failed: x")


def test_a_running_app_at_its_target_is_not_degraded() -> None:
    assert degraded_cause(AppView(app="m", status="HEALTHY", target=2, replicas=[replica("a"), replica("b")])) is None


def test_a_rollout_or_scale_up_is_not_degraded() -> None:
    view = AppView(app="m", status="UPSCALING", target=3, replicas=[replica("a"), replica("b", state="STARTING")])
    assert degraded_cause(view) is None


def test_unschedulable_replicas_are_degraded_with_serve_reason_and_dead_nodes() -> None:
    view = AppView(
        app="m",
        status="UNHEALTHY",
        message="Deployment 'ModelServer' has 1 replicas that have taken more than 30s to be scheduled. "
        'Resources required for each replica: {"CPU": 1.0}, total resources available: {}.',
        target=2,
        replicas=[replica("a"), replica("b", state="STARTING")],
        dead_nodes=["10.0.0.7 (5f2a9c1e)"],
    )
    cause = degraded_cause(view)
    assert cause.startswith("1 of 2 replicas running; 1 waiting (STARTING); Serve: Deployment 'ModelServer' has 1")
    assert cause.endswith("dead nodes: 10.0.0.7 (5f2a9c1e)")
    # Scheduling trouble is reported even while Serve calls the deployment UPSCALING.
    assert degraded_cause(view.model_copy(update={"status": "UPSCALING"})) == cause
