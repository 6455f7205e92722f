"""A new version of a running DeepSpeed group: started beside it (surge) or in its place (replace).

``upgrade_room`` decides (``deepspeed.upgrade``): ``surge`` always starts the new group beside the
old one, ``replace`` never does, ``auto`` does when there is room for a second group: for ranks on
other hosts, enough hosts of the inventory (placement hosts, then spares) that the running group
does not use; for ranks all on this machine, enough available memory for a second copy (the
plan's memory per rank times its ranks).

``surge`` launches the new group in a folder of its own (``launcher.group_dir``: its record,
rank-0 port, rendezvous port and launch id), waits for every rank, smoke-tests it at rank 0, then
switches: the app's record (``cluster.json``, what the front follows) names the new group in one
atomic write, the front moves to it (requests under way on the old group finish there), and the
old group stops once rank 0 has nothing in flight. A new group that fails is stopped and the old
one serves on, untouched. ``FrontWatch`` reads what the front held while a replace stopped the
old group, for the deploy's report.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Literal, TypeVar

from pydantic import BaseModel

from nodewise.core.errors import DeployFailed
from nodewise.core.procs import free_port
from nodewise.core.settings import Settings
from nodewise.core.state import write_json
from serving.dist_env import is_local_host
from serving.spec import DeepSpeedSpec
from tasks.mpi.front import follow, front_state, read_front
from tasks.mpi.health import wait_ready
from tasks.mpi.hosts import choose_hosts
from tasks.mpi.launcher import group_dir, launch, stop_group
from tasks.mpi.records import LaunchedCluster, Placement, cluster_dir
from tasks.planning.placement import PlacementPlan

T = TypeVar("T")
SWITCH_TIMEOUT_S = 10.0  # the front reads the record about once a second while it serves
_IN_FLIGHT = re.compile(r"^nodewise_requests_in_flight\{[^}]*\} ([0-9.e+-]+)$", re.M)


class Upgrade(BaseModel):
    """How a deploy replaced the app's group, for its report."""

    mode: Literal["first", "surge", "replace"]
    why: str = ""  # why surge or replace (``upgrade_room``)
    held_s: float = 0.0  # replace: how long the front held requests (old group stopped -> new one ready)
    held_requests: int = 0  # replace: requests the front held meanwhile
    drained_s: float = 0.0  # surge: from the switch until the old group had nothing in flight

    def line(self) -> str:
        """``upgraded beside the old group (...)`` / ``the front held 12 requests for 9.1 s (...)``."""
        if self.mode == "surge":
            return f"upgraded beside the old group ({self.why}); the old one stopped after {self.drained_s:.1f} s"
        if self.mode == "replace":
            return f"the front held {self.held_requests} requests for {self.held_s:.1f} s ({self.why})"
        return "first group of this app"


def upgrade_room(
    plan: PlacementPlan, running: LaunchedCluster, settings: Settings, available_bytes: int | None = None
) -> tuple[list[str] | None, str]:
    """Where a second group would run beside ``running``: its hosts (None: no room), and why.

    ``available_bytes``: this machine's available memory (default: psutil's), for local ranks.
    """
    mode = settings.deepspeed.upgrade
    if mode == "replace":
        return None, "deepspeed.upgrade is replace"
    if not settings.deepspeed.front:
        return None, "no front to switch (deepspeed.front is off): the endpoint is rank 0's port"
    planned = plan.hosts or ["localhost"] * plan.nodes
    if all(is_local_host(h) for h in [*planned, *running.hosts]):
        needed = plan.needed_bytes * plan.ranks
        if available_bytes is None:
            import psutil

            available_bytes = int(psutil.virtual_memory().available)
        if mode == "surge" or available_bytes >= needed:
            return planned, f"a second copy needs {needed / 2**20:.0f} MiB, {available_bytes / 2**20:.0f} MiB available"
        return None, f"no room: a second copy needs {needed / 2**20:.0f} MiB, {available_bytes / 2**20:.0f} available"
    free = [h for h in dict.fromkeys([*planned, *plan.spare_hosts]) if h not in running.hosts]
    if len(free) >= len(planned):
        return free, f"{len(free)} host(s) free beside the running group's {len(running.hosts)}"
    if mode == "surge":
        return None, f"deepspeed.upgrade is surge, but only {len(free)} of {len(planned)} hosts are free"
    return None, f"no room: {len(free)} host(s) free beside the running group, {len(planned)} needed"


def surge(
    spec: DeepSpeedSpec,
    plan: PlacementPlan,
    candidates: list[str],
    old: LaunchedCluster,
    settings: Settings,
    check: Callable[[str], T],
) -> tuple[T, float]:
    """Start ``spec`` beside ``old``, check it at rank 0, switch the app to it, stop ``old``.

    Returns what ``check`` returned and how long the old group took to drain.

    Raises:
        DeployFailed: the new group did not start or failed ``check``; it is stopped, ``old`` serves on.
        NotEnoughHosts: fewer free hosts answer than the group needs; nothing was started.
    """
    wanted = len(plan.hosts) if plan.hosts else plan.nodes
    hosts, _ = choose_hosts(
        Placement(hosts=candidates[:wanted], ranks_per_host=1, spares=candidates[wanted:]), settings
    )
    spares = [h for h in [*plan.hosts, *plan.spare_hosts] if h not in hosts]
    beside = spec.model_copy(update={"port": free_port()})  # the old rank 0 keeps its port until it stops
    cluster = launch(
        beside, hosts, plan.devices_per_node, settings, spares=spares, folder=group_dir(settings, spec.app_name)
    )
    try:
        wait_ready(cluster, settings.deepspeed.ready_timeout_s)
        result = check(cluster.endpoint)
    except DeployFailed as e:
        stop_group(settings, cluster)
        raise DeployFailed(f"{e} (the new group was stopped; version {_version(old)} serves on, untouched)") from e
    except BaseException:
        stop_group(settings, cluster)
        raise
    return result, switch(settings, old, cluster, spares)


def switch(settings: Settings, old: LaunchedCluster, new: LaunchedCluster, spares: list[str]) -> float:
    """Make ``new`` the app's group (its record, its placement, the front's upstream), then stop
    ``old`` once its rank 0 has nothing in flight; returns the seconds that drain took."""
    folder = cluster_dir(settings, new.app_name)
    placement = Placement(hosts=new.hosts, ranks_per_host=new.ranks // len(new.hosts), spares=spares)
    write_json(folder / "placement.json", placement.model_dump())
    write_json(folder / "cluster.json", new.model_dump(mode="json"))  # one atomic replace: the front follows it
    follow(settings, new.app_name, new.endpoint)
    started = time.monotonic()
    _wait_front_follows(settings, new)
    _wait_drained(old, settings.deepspeed.request_timeout_s)
    drained = time.monotonic() - started
    stop_group(settings, old)
    return drained


def _wait_front_follows(settings: Settings, new: LaunchedCluster) -> None:
    front = read_front(settings, new.app_name)
    if front is None:
        return
    deadline = time.monotonic() + SWITCH_TIMEOUT_S
    while time.monotonic() < deadline:
        state = front_state(front)
        if state is not None and state.get("upstream") == new.endpoint.rstrip("/"):
            return
        time.sleep(0.1)


def _wait_drained(old: LaunchedCluster, timeout_s: float) -> None:
    """Until the old rank 0's ``nodewise_requests_in_flight`` reads 0 (without metrics: a second)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            text = httpx.get(f"{old.endpoint}/metrics", timeout=2.0).text
        except httpx.HTTPError:
            return  # gone already
        counts = [float(v) for v in _IN_FLIGHT.findall(text)]
        if not counts:
            time.sleep(1.0)
            return
        if sum(counts) == 0:
            return
        time.sleep(0.1)


def _version(cluster: LaunchedCluster) -> str:
    from pathlib import Path

    try:
        return DeepSpeedSpec.model_validate_json(Path(cluster.spec_path).read_text()).model_version
    except (OSError, ValueError):
        return "before"


class FrontWatch:
    """What the app's front held between ``start`` and ``stop`` (a replace's hold): seconds, requests."""

    def __init__(self, settings: Settings, app_name: str) -> None:
        self.front = read_front(settings, app_name)
        self.started = time.monotonic()
        self.holds = self._holds()

    def _holds(self) -> float:
        import httpx

        if self.front is None:
            return 0.0
        try:
            text = httpx.get(f"{self.front.endpoint}/metrics", timeout=2.0).text
        except httpx.HTTPError:
            return 0.0
        found = re.search(r"^nodewise_front_holds_total\{[^}]*\} ([0-9.e+-]+)$", text, re.M)
        return float(found.group(1)) if found else 0.0

    def stop(self) -> tuple[float, int]:
        """Wait (up to ``SWITCH_TIMEOUT_S``) for the front to serve again; the hold's seconds and requests."""
        deadline = time.monotonic() + SWITCH_TIMEOUT_S
        while self.front is not None and time.monotonic() < deadline:
            state = front_state(self.front)
            if state is not None and state.get("ready"):
                break
            time.sleep(0.05)
        return time.monotonic() - self.started, int(self._holds() - self.holds)
