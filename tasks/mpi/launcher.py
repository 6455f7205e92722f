"""The multi-node backend's launcher: mpirun started from the plan, supervised, stopped clean.

``launch`` writes the spec every rank reads (``spec.json``), starts mpirun (``command.py``)
under its supervisor (``supervise.py``) in a session of its own, with its output in
``mpirun.log``, records it (``records.py``: ``cluster.json``, ``placement.json``) and returns at
once (``health.wait_ready``). A group launched beside the running one for an upgrade
(``tasks/mpi/upgrade.py``) gets a folder of its own, ``<app>/group-<id>/`` (``group_dir``), with its
own record, rendezvous port and launch id. ``relaunch`` stops the job and launches it again on the
hosts that are up (``hosts.choose_hosts``). ``stop_group`` stops one group by its record;
``stop_cluster`` stops every group of the app (the one on record, and any an aborted upgrade left),
its ranks on other hosts and its shared memory; it is idempotent. DeepSpeed's compiled ops are cached in
``<state>/torch_extensions``: only the first launch on a machine builds them (~85 s).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from nodewise.core.errors import ClusterUnavailable
from nodewise.core.procs import free_port, port_open, session_members, stop_processes
from nodewise.core.runtime import SOURCE_ROOT, library_environment
from nodewise.core.settings import Settings
from nodewise.core.state import atomic_write, read_json, write_json
from serving._lm import local_shm_files
from serving.dist_env import is_local_host
from serving.spec import SPEC_ENV, DeepSpeedSpec
from tasks.mpi.command import mpirun_command
from tasks.mpi.hosts import choose_hosts, job_sessions, remove_rendezvous_files, stop_remote_ranks
from tasks.mpi.records import (
    CHILDREN,
    GROUP_PREFIX,
    LEFTOVERS,
    LaunchedCluster,
    Placement,
    cluster_dir,
    read_cluster,
    read_placement,
)
from tasks.mpi.supervise import EXIT_FILE

_FORWARDED = (
    "PYTHONPATH",
    "PYTHONFAULTHANDLER",
    "TORCH_EXTENSIONS_DIR",
    "MASTER_ADDR",
    "MASTER_PORT",
    "OMP_NUM_THREADS",
    "TOKENIZERS_PARALLELISM",
    "HF_HUB_OFFLINE",
    "MLFLOW_DISABLE_TELEMETRY",
    "MLFLOW_TRACKING_URI",  # the spec hides a URI's password: remote ranks get the whole URI here
    "MLFLOW_REGISTRY_URI",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR",
    SPEC_ENV,  # the spec itself: other hosts do not have this machine's state folder
)


def launch(
    spec: DeepSpeedSpec,
    hosts: list[str],
    ranks_per_host: int,
    settings: Settings,
    spares: list[str] | None = None,
    folder: Path | None = None,
) -> LaunchedCluster:
    """Start the ranks under mpirun and record them; returns at once (see ``wait_ready``).

    ``spares``: other hosts able to take a host's place when one is down at a restart.
    ``folder``: a group beside the app's running one (``group_dir``): its record stays there, and
    its rendezvous port is a free one even when ``deepspeed.master_port`` is set.
    """
    ds = settings.deepspeed
    mpirun = shutil.which(ds.mpirun)
    if mpirun is None:
        raise ClusterUnavailable(
            f"{ds.mpirun!r} was not found: install Open MPI (apt-get install openmpi-bin) or set "
            "NODEWISE_DEEPSPEED__MPIRUN to its path"
        )
    local = all(is_local_host(h) for h in hosts)
    if local and port_open("127.0.0.1", spec.port):
        raise ClusterUnavailable(
            f"port {spec.port} is already in use by something else; set NODEWISE_DEEPSPEED__PORT to a free port"
        )
    master_addr = "127.0.0.1" if local else hosts[0]
    beside = folder is not None
    master_port = free_port() if beside else (ds.master_port or free_port())
    folder = folder or cluster_dir(settings, spec.app_name)
    folder.mkdir(parents=True, exist_ok=True)
    spec_path = folder / "spec.json"
    atomic_write(spec_path, spec.model_dump_json(indent=2))
    remove_rendezvous_files(folder)  # a killed launch's file would confuse this one's ranks
    (folder / EXIT_FILE).unlink(missing_ok=True)
    env = {
        **os.environ,
        **library_environment(settings),
        "PYTHONPATH": os.pathsep.join(p for p in (str(SOURCE_ROOT), os.environ.get("PYTHONPATH", "")) if p),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        "OMP_NUM_THREADS": str(spec.torch_threads),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONFAULTHANDLER": "1",  # a rank that crashes in native code leaves its Python stack in mpirun.log
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        SPEC_ENV: spec.model_dump_json(),
    }
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE"):  # derived by each rank, never inherited
        env.pop(name, None)
    names = [n for n in _FORWARDED if n in env]
    launch_id = secrets.token_hex(4)
    python = ds.python or sys.executable
    cmd = mpirun_command(
        mpirun, python, spec_path, hosts, ranks_per_host, names, ds.mpirun_args, ds.remote_shell, launch_id
    )
    supervisor = [sys.executable, "-m", "tasks.mpi.supervise", str(folder)]
    if env.get("PREFECT_API_URL"):
        supervisor += ["--events", env["PREFECT_API_URL"]]
    log_path = folder / "mpirun.log"
    with open(log_path, "ab") as log:
        log.write(f"\n=== {datetime.now(UTC).isoformat(timespec='seconds')} {' '.join(cmd)}\n".encode())
        log.flush()
        process = subprocess.Popen(
            [*supervisor, "--", *cmd],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    CHILDREN[process.pid] = process
    endpoint_host = "127.0.0.1" if local else hosts[0]
    cluster = LaunchedCluster(
        app_name=spec.app_name,
        pid=process.pid,
        hosts=hosts,
        ranks=len(hosts) * ranks_per_host,
        master_addr=master_addr,
        master_port=master_port,
        port=spec.port,
        endpoint=f"http://{endpoint_host}:{spec.port}",
        command=cmd,
        launch_id=launch_id,
        log_path=str(log_path),
        spec_path=str(spec_path),
        started_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    write_json(folder / "cluster.json", cluster.model_dump(mode="json"))
    # Kept after a stop: a restart relaunches on these hosts (or spares) with the same spec.
    if spares is None:
        spares = read_json(folder / "placement.json").get("spares", []) if (folder / "placement.json").exists() else []
    placement = Placement(hosts=hosts, ranks_per_host=ranks_per_host, spares=[h for h in spares if h not in hosts])
    write_json(folder / "placement.json", placement.model_dump())
    return cluster


def relaunch(settings: Settings, app_name: str, spec: DeepSpeedSpec) -> LaunchedCluster:
    """Stop whatever runs of the app's job and launch it again (a fresh rendezvous port).

    On the same hosts; a host that is down is replaced by a spare (``choose_hosts``), and too few
    hosts up raise ``NotEnoughHosts`` with nothing stopped that still served.
    """
    placement = read_placement(settings, app_name)
    hosts, _ = choose_hosts(placement, settings)
    stop_cluster(settings, app_name)
    spares = [h for h in [*placement.hosts, *placement.spares] if h not in hosts]
    return launch(spec, hosts, placement.ranks_per_host, settings, spares=spares)


def group_dir(settings: Settings, app_name: str) -> Path:
    """A new folder for a group launched beside the app's running one (``launch(folder=...)``)."""
    return cluster_dir(settings, app_name) / f"{GROUP_PREFIX}{secrets.token_hex(4)}"


def stop_group(settings: Settings, cluster: LaunchedCluster) -> list[str]:
    """Stop one group by its record (its session, ranks left on other hosts, shared memory); a
    group launched beside another loses its folder too, unless ranks on a host it could not reach
    are noted there."""
    folder = Path(cluster.spec_path).parent
    sessions = {*job_sessions(Path(cluster.spec_path)), cluster.pid}
    killed = sum(_stop_session(sid, settings.deepspeed.stop_grace_s) for sid in sorted(sessions))
    done = [f"stopped DeepSpeed app {cluster.app_name} ({killed} process(es))"] if killed else []
    done += stop_remote_ranks(settings, dict.fromkeys(cluster.hosts, cluster.launch_id), cluster.spec_path)
    # mpirun cannot clean up after ranks it killed: their shm all-reduce buffers stay behind.
    for path in local_shm_files(cluster.master_addr, cluster.master_port):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    remove_rendezvous_files(folder)
    CHILDREN.pop(cluster.pid, None)
    if folder.name.startswith(GROUP_PREFIX) and not (folder / LEFTOVERS).exists():
        shutil.rmtree(folder, ignore_errors=True)
    return done


def stop_cluster(settings: Settings, app_name: str) -> list[str]:
    """Stop every process of the app's job and remove its shared memory; idempotent.

    The group on record, and any group an aborted upgrade left beside it (``group-*`` folders).
    """
    cluster = read_cluster(settings, app_name)
    folder = cluster_dir(settings, app_name)
    done = stop_group(settings, cluster) if cluster is not None else []
    for record in sorted(folder.glob(f"{GROUP_PREFIX}*/cluster.json")):
        with contextlib.suppress(OSError, ValueError):
            done += stop_group(settings, LaunchedCluster.model_validate_json(record.read_text()))
    # Also any mpirun of this app that no record names: a launcher killed between starting it and
    # recording it (a watchdog killed mid-restart) must not leave a second group running.
    for spec_path in [folder / "spec.json", *folder.glob(f"{GROUP_PREFIX}*/spec.json")]:
        killed = sum(_stop_session(sid, settings.deepspeed.stop_grace_s) for sid in job_sessions(spec_path))
        done += [f"stopped DeepSpeed app {app_name} ({killed} process(es))"] if killed else []
    for group in folder.glob(f"{GROUP_PREFIX}*"):
        if not (group / LEFTOVERS).exists():
            shutil.rmtree(group, ignore_errors=True)
    remove_rendezvous_files(folder)
    (folder / "cluster.json").unlink(missing_ok=True)
    return done


def _stop_session(sid: int, grace_s: float) -> int:
    """SIGTERM every process of session ``sid`` (mpirun and its ranks), SIGKILL what remains."""
    stopped = stop_processes(lambda: session_members(sid), grace_s)
    child = CHILDREN.get(sid)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=5)
    return stopped
