"""What was launched for each DeepSpeed app, on record: the job's folder and the files in it.

One folder per app, ``<state>/deepspeed/<app>/`` (``cluster_dir``): ``cluster.json`` (the
running launch: ``LaunchedCluster``, removed by a stop), ``placement.json`` (``Placement``: the
hosts and spares, kept after a stop so a restart can relaunch), ``exit.json`` (the supervisor's
record of how mpirun exited, ``tasks/mpi/supervise.py``) and ``leftovers.json`` (``{host: launch
id}`` of ranks a stop could not reach). A group launched beside the running one for an upgrade
keeps the same files in ``<app>/group-<id>/``; once it takes over, the app's ``cluster.json``
names it (its ``spec_path`` points into its folder). Readers here never start or stop anything. ``CHILDREN``
is the in-process half of the record: the supervisors this process started, so their exit
status is read without a zombie and a stop reaps them.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from nodewise.core.errors import ClusterUnavailable
from nodewise.core.settings import Settings
from nodewise.core.state import read_json
from tasks.mpi.supervise import EXIT_FILE

GROUP_PREFIX = "group-"  # <app>/group-<id>/: a group launched beside the running one (tasks/mpi/upgrade.py)
LEFTOVERS = "leftovers.json"  # {host: launch id} of ranks a stop could not reach (tasks/mpi/hosts.py)
CHILDREN: dict[int, subprocess.Popen[bytes]] = {}  # the supervisors this process started, by pid


class LaunchedCluster(BaseModel):
    """What was launched for one app, as recorded in ``cluster.json``."""

    app_name: str
    pid: int  # the supervisor's (tasks/mpi/supervise.py), which leads the job's session on this machine
    hosts: list[str]
    ranks: int
    master_addr: str
    master_port: int
    port: int
    endpoint: str
    command: list[str]
    launch_id: str = ""  # in every rank's command line: a cleanup of this launch spares the next one
    log_path: str
    spec_path: str
    started_at: str


class Placement(BaseModel):
    """Where the app's ranks run, and which other hosts may stand in for one that is down."""

    hosts: list[str]
    ranks_per_host: int
    spares: list[str] = []


def cluster_dir(settings: Settings, app_name: str) -> Path:
    return settings.state.deepspeed_job(app_name)


def read_cluster(settings: Settings, app_name: str) -> LaunchedCluster | None:
    path = cluster_dir(settings, app_name) / "cluster.json"
    if not path.exists():
        return None
    return LaunchedCluster.model_validate_json(path.read_text())


def read_placement(settings: Settings, app_name: str) -> Placement:
    path = cluster_dir(settings, app_name) / "placement.json"
    if not path.exists():
        raise ClusterUnavailable(f"DeepSpeed app {app_name} was never launched here; deploy it first")
    return Placement.model_validate(read_json(path))


def launched_apps(settings: Settings) -> set[str]:
    """Apps with a launched job on record (running or not)."""
    if not settings.state.deepspeed.exists():
        return set()
    return {p.parent.name for p in settings.state.deepspeed.glob("*/cluster.json")}


def exit_record(cluster: LaunchedCluster) -> dict[str, Any] | None:
    """The supervisor's ``exit.json`` for this launch: status, time, whether it was a stop."""
    with contextlib.suppress(OSError, ValueError):
        record = json.loads((Path(cluster.spec_path).parent / EXIT_FILE).read_text())
        if isinstance(record, dict) and "status" in record and "t" in record:
            return record
    return None


def read_leftovers(folder: Path) -> dict[str, str]:
    """``leftovers.json`` in ``folder``: ``{host: launch id}`` of ranks a stop could not reach, {} if none."""
    path = folder / LEFTOVERS
    return {str(k): str(v) for k, v in read_json(path).items()} if path.exists() else {}
