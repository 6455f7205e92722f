"""The Backend interface: its registry, each implementation's parts that need no cluster, and the
watchdog's one loop over every record, driven through a fake backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nodewise.core.errors import InvalidInput
from nodewise.core.settings import Settings
from nodewise.core.state import write_json
from tasks.backend import Action, Backend, WatchPass
from tasks.backends import BACKENDS, backend_for
from tasks.k8s.backend import Kubernetes, backend_name
from tasks.mpi.backend import DeepSpeedMpi
from tasks.mpi.records import LaunchedCluster, cluster_dir
from tasks.planning.placement import DEEPSPEED_MPI, RAY_SERVE
from tasks.rayserve.backend import RayServe
from tasks.records import DeploymentRecord, load_records
from tests.unit.factories import resolved_model


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(state_dir=tmp_path / "state", watchdog={"max_restarts": 2, "window_s": 600, "backoff_s": 0})


def _record(app: str, backend: str, endpoint: str = "http://127.0.0.1:9/x", **spec: Any) -> DeploymentRecord:
    return DeploymentRecord(
        app_name=app,
        model_name=app,
        model_version="1",
        model_uri=f"models:/{app}/1",
        backend=backend,
        endpoint=endpoint,
        replicas=1,
        plan="test",
        spec=spec,
    )


def test_every_name_a_record_or_a_plan_carries_has_one_backend() -> None:
    assert isinstance(backend_for(RAY_SERVE), RayServe)
    assert isinstance(backend_for(DEEPSPEED_MPI), DeepSpeedMpi)
    for kind in ("RayService", "MPIJob", "LeaderWorkerSet"):
        assert isinstance(backend_for(backend_name(kind)), Kubernetes)
    names = [name for backend in BACKENDS for name in backend.names]
    assert len(names) == len(set(names)), "two backends answer to one name"
    assert all(isinstance(backend, Backend) for backend in BACKENDS)  # every operation, in every room
    with pytest.raises(InvalidInput, match=r"no backend is named 'slurm'; known: deepspeed_mpi, k8s-"):
        backend_for("slurm")


def test_only_ray_serve_runs_a_challenger_beside_its_champion() -> None:
    assert [b.rollouts for b in BACKENDS] == [False, True, False]
    assert [b.local for b in BACKENDS] == [True, True, False]  # `down` stops the first two


def test_old_records_load_and_read_their_spec_typed(settings: Settings) -> None:
    from serving.spec import ModelServeSpec

    spec = ModelServeSpec(
        app_name="digits",
        route_prefix="/digits",
        model_uri="models:/digits/1",
        model_name="digits",
        model_version="1",
        tracking_uri="sqlite:///mlflow.db",
        registry_uri="sqlite:///mlflow.db",
        flavor="pytorch",
    ).model_dump(mode="json")
    on_disk = _record("digits", RAY_SERVE, **spec).model_dump(mode="json")
    write_json(settings.state.records, {"digits": on_disk})  # as deployments.json has it today
    record = load_records(settings.state.records)["digits"]
    assert record.serve_spec().max_error_rate == 0.5
    assert record.model_dump(mode="json") == on_disk  # written back unchanged


def test_ray_serve_parts_that_need_no_cluster(settings: Settings) -> None:
    serve = RayServe()
    idle = _record("idle", RAY_SERVE, min_replicas=0)
    assert serve.state(settings, idle, {"running": 0}) == "scaled_to_zero"
    assert serve.state(settings, idle, {"running": 1}) is None  # its /ping decides
    assert serve.logs(settings, "idle", 10, idle) is not None
    assert "replica_idle_" in (serve.logs(settings, "idle", 10, idle) or "")
    assert serve.logs(settings, "idle", 10, None) is None  # no record: nothing of it on Serve
    assert serve.scrape_targets(settings, idle, deployed=False) is None  # the watchdog follows replicas
    assert serve.leftovers(settings) == set()


def test_deepspeed_parts_read_the_job_folder(settings: Settings) -> None:
    ds = DeepSpeedMpi()
    record = _record("lm", DEEPSPEED_MPI, "http://127.0.0.1:8100", tp_size=2)
    assert ds.state(settings, record, {}) == "down"  # no job on record
    assert ds.scrape_targets(settings, record, deployed=False) is None
    assert ds.scrape_targets(settings, record, deployed=True) == {None: "127.0.0.1:8100"}
    assert ds.logs(settings, "lm", 10, None) is None
    folder = cluster_dir(settings, "lm")
    folder.mkdir(parents=True)
    (folder / "mpirun.log").write_text("a\nb\nc\n")
    cluster = LaunchedCluster(
        app_name="lm",
        pid=1,
        hosts=["10.0.0.5"],
        ranks=2,
        master_addr="10.0.0.5",
        master_port=29500,
        port=8100,
        endpoint="http://10.0.0.5:8100",
        command=["mpirun"],
        log_path=str(folder / "mpirun.log"),
        spec_path=str(folder / "spec.json"),
        started_at="now",
    )
    write_json(folder / "cluster.json", cluster.model_dump(mode="json"))
    assert ds.leftovers(settings) == {"lm"}
    assert ds.scrape_targets(settings, record, deployed=False) == {None: "10.0.0.5:8100"}  # rank 0 moved
    assert ds.logs(settings, "lm", 2, None) == "b\nc"  # kept for a job without a record
    [row] = ds.status(settings, [record]).values()
    assert row["ranks"] == 2
    assert row["health"] == "unreachable"


def test_kubernetes_parts(settings: Settings) -> None:
    k8s = Kubernetes()
    record = _record("ns/digits", backend_name("RayService"), objects=[])
    assert k8s.state(settings, record, {}) == "serving"  # as the watchdog judged its pods
    assert k8s.stop(settings, ["ns/digits"]) == []  # `down` leaves a cluster's workloads alone
    assert k8s.status(settings, [record])["ns/digits"]["health"].startswith("on Kubernetes")
    with pytest.raises(InvalidInput, match="render models:/m/1 --apply"):
        k8s.deploy(resolved_model(), None, settings, settings.serve, None)  # type: ignore[arg-type]


class _Fake:
    """A backend for the engine's loop: sick until it has been restarted once."""

    names = ("fake",)
    rollouts = False
    local = True

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.restarted: list[str] = []

    def watch(self, settings: Settings, record: DeploymentRecord, this: WatchPass) -> list[Action]:
        self.seen.append(record.app_name)
        if record.app_name in self.restarted:
            return this.degraded(None)

        def restart() -> tuple[float, str]:
            self.restarted.append(record.app_name)
            return 0.5, "restarted"

        return [*this.degraded("sick"), this.budgeted("nodewise.cluster.restarted", "sick", "all ranks", restart)]


def test_the_watchdog_checks_every_record_through_its_backend(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.watchdog import engine

    fake = _Fake()
    monkeypatch.setattr(engine, "backend_for", lambda name: fake)
    write_json(settings.state.records, {"here": _record("here", "fake").model_dump(mode="json")})
    write_json(settings.state.k8s_records, {"ns/there": _record("ns/there", "fake").model_dump(mode="json")})

    first = engine.watch_once(settings)
    assert fake.seen == ["here", "ns/there"]  # one loop: this machine's records, then the cluster's
    assert [(a.app, a.event) for a in first] == [
        ("here", "nodewise.deployment.degraded"),
        ("here", "nodewise.cluster.restarted"),
        ("ns/there", "nodewise.deployment.degraded"),
        ("ns/there", "nodewise.cluster.restarted"),
    ]
    assert first[1].duration_s == 0.5
    second = engine.watch_once(settings)
    assert [(a.app, a.event) for a in second] == [
        ("here", "nodewise.deployment.recovered"),
        ("ns/there", "nodewise.deployment.recovered"),
    ]
    apps, _ = engine.load_watch(settings)
    assert [len(apps[name].restarts) for name in ("here", "ns/there")] == [1, 1]
