"""tasks/mpi/upgrade.py: when a new version's group starts beside the running one, and where."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nodewise.core.settings import Settings
from tasks.mpi.launcher import stop_cluster
from tasks.mpi.records import GROUP_PREFIX, LaunchedCluster
from tasks.mpi.upgrade import Upgrade, upgrade_room
from tasks.planning.placement import PlacementPlan

MIB = 2**20


def plan(hosts: list[str], spares: list[str] | None = None, per_rank_mib: int = 100) -> PlacementPlan:
    return PlacementPlan(
        fits=True,
        backend="deepspeed_mpi",
        layout="multi-node",
        needed_bytes=per_rank_mib * MIB,
        budget_bytes=1000 * MIB,
        largest_budget_bytes=1000 * MIB,
        nodes=len(hosts),
        hosts=hosts,
        spare_hosts=spares or [],
    )


def running(hosts: list[str], tmp_path: Path) -> LaunchedCluster:
    return LaunchedCluster(
        app_name="app",
        pid=1,
        hosts=hosts,
        ranks=len(hosts),
        master_addr=hosts[0],
        master_port=29500,
        port=8501,
        endpoint=f"http://{hosts[0]}:8501",
        command=[],
        log_path=str(tmp_path / "mpirun.log"),
        spec_path=str(tmp_path / "spec.json"),
        started_at="",
    )


def test_local_ranks_surge_when_this_machines_memory_holds_a_second_copy(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path)
    two = plan(["localhost", "localhost"])  # 2 ranks of 100 MiB
    old = running(["localhost", "localhost"], tmp_path)
    hosts, why = upgrade_room(two, old, settings, available_bytes=250 * MIB)
    assert hosts == ["localhost", "localhost"]
    assert "200 MiB" in why
    hosts, why = upgrade_room(two, old, settings, available_bytes=150 * MIB)
    assert hosts is None
    assert why.startswith("no room: a second copy needs 200 MiB")


def test_other_hosts_surge_onto_inventory_hosts_the_running_group_does_not_use(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path)
    old = running(["10.40.0.11", "10.40.0.12"], tmp_path)
    roomy = plan(["10.40.0.11", "10.40.0.12"], spares=["10.40.0.13", "10.40.0.14", "10.40.0.15"])
    hosts, _ = upgrade_room(roomy, old, settings)
    assert hosts == ["10.40.0.13", "10.40.0.14", "10.40.0.15"]  # the first two take ranks, the rest are spares
    tight = plan(["10.40.0.11", "10.40.0.12"], spares=["10.40.0.13"])
    hosts, why = upgrade_room(tight, old, settings)
    assert hosts is None
    assert why == "no room: 1 host(s) free beside the running group, 2 needed"


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"upgrade": "replace"}, "deepspeed.upgrade is replace"),
        ({"front": False}, "no front to switch"),
    ],
)
def test_replace_is_chosen_by_setting_or_without_a_front(tmp_path: Path, overrides: dict, reason: str) -> None:
    settings = Settings(state_dir=tmp_path, deepspeed=overrides)
    hosts, why = upgrade_room(plan(["localhost"] * 2), running(["localhost"] * 2, tmp_path), settings, 10**12)
    assert hosts is None
    assert why.startswith(reason)


def test_surge_setting_ignores_memory_but_not_missing_hosts(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path, deepspeed={"upgrade": "surge"})
    local = upgrade_room(plan(["localhost"] * 2), running(["localhost"] * 2, tmp_path), settings, 0)
    assert local[0] == ["localhost", "localhost"]
    remote = upgrade_room(plan(["10.40.0.11"]), running(["10.40.0.11"], tmp_path), settings)
    assert remote == (None, "deepspeed.upgrade is surge, but only 0 of 1 hosts are free")


def test_the_reports_say_how_the_group_was_replaced() -> None:
    assert Upgrade(mode="replace", why="no room", held_s=9.14, held_requests=12).line() == (
        "the front held 12 requests for 9.1 s (no room)"
    )
    assert Upgrade(mode="surge", why="room", drained_s=0.4).line().startswith("upgraded beside the old group (room)")


def test_a_stop_ends_a_group_an_aborted_upgrade_left_beside_and_removes_its_folder(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path, deepspeed={"stop_grace_s": 2})
    group = settings.state.deepspeed_job("app") / f"{GROUP_PREFIX}abcd"
    group.mkdir(parents=True)
    spec_path = group / "spec.json"
    spec_path.write_text("{}")
    # an "mpirun" of that group no record names (its launcher killed before the switch)
    stray = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", str(spec_path)], start_new_session=True
    )
    try:
        done = stop_cluster(settings, "app")
        stray.wait(timeout=10)  # gone (psutil reaped it: no status left to read)
        assert done == ["stopped DeepSpeed app app (1 process(es))"]
        assert not group.exists()
    finally:
        stray.kill()
