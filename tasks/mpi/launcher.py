"""The multi-node backend's launcher: mpirun started from the plan, supervised, stopped clean.

One cluster per app, all in ``<state>/deepspeed/<app>/``: the spec every rank reads
(``spec.json``), mpirun's output (``mpirun.log``) and what was launched (``cluster.json``: pid,
ports, hosts, command). ``mpirun`` runs in a session of its own, so stopping it reaches every
process it started; DeepSpeed's shared-memory buffers of the job are removed after it.
DeepSpeed's compiled ops are cached in ``<state>/torch_extensions``: only the first launch on a
machine builds them (~85 s).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from nodewise.core.errors import ClusterUnavailable, DeployFailed
from nodewise.core.procs import free_port, port_open, session_members, stop_processes
from nodewise.core.runtime import SOURCE_ROOT, library_environment
from nodewise.core.settings import Settings
from nodewise.core.state import atomic_write, read_json, write_json
from serving._lm import local_shm_files
from serving.deepspeed_worker import ERROR_MARK
from serving.dist_env import RENDEZVOUS_PREFIX, is_local_host
from serving.spec import DeepSpeedSpec

_FORWARDED = (
    "PYTHONPATH",
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
)


class LaunchedCluster(BaseModel):
    """What was launched for one app, as recorded in ``cluster.json``."""

    app_name: str
    pid: int
    hosts: list[str]
    ranks: int
    master_addr: str
    master_port: int
    port: int
    endpoint: str
    command: list[str]
    log_path: str
    spec_path: str
    started_at: str


def cluster_dir(settings: Settings, app_name: str) -> Path:
    return settings.state.deepspeed_job(app_name)


def mpirun_command(
    mpirun: str,
    python: str,
    spec_path: Path,
    hosts: list[str],
    ranks_per_host: int,
    env_names: list[str],
    extra: list[str],
) -> list[str]:
    """The mpirun command line: one rank per device, ``ranks_per_host`` on each host, in host order."""
    local = all(is_local_host(h) for h in hosts)
    host_arg = f"localhost:{len(hosts) * ranks_per_host}" if local else ",".join(f"{h}:{ranks_per_host}" for h in hosts)
    cmd = [mpirun]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    cmd += ["-np", str(len(hosts) * ranks_per_host), "--host", host_arg, "--map-by", "slot", "--bind-to", "none"]
    if local:
        cmd.append("--oversubscribe")  # "nodes" of one machine: a core may hold several ranks
    for name in env_names:
        cmd += ["-x", name]
    return [*cmd, *extra, python, "-m", "serving.deepspeed_worker", str(spec_path)]


def launch(spec: DeepSpeedSpec, hosts: list[str], ranks_per_host: int, settings: Settings) -> LaunchedCluster:
    """Start the ranks under mpirun and record them; returns at once (see ``wait_ready``)."""
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
    master_port = ds.master_port or free_port()
    folder = cluster_dir(settings, spec.app_name)
    folder.mkdir(parents=True, exist_ok=True)
    spec_path = folder / "spec.json"
    atomic_write(spec_path, spec.model_dump_json(indent=2))
    _remove_rendezvous_files(folder)  # a killed launch's file would confuse this one's ranks
    env = {
        **os.environ,
        **library_environment(settings),
        "PYTHONPATH": os.pathsep.join(p for p in (str(SOURCE_ROOT), os.environ.get("PYTHONPATH", "")) if p),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        "OMP_NUM_THREADS": str(spec.torch_threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
    }
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE"):  # derived by each rank, never inherited
        env.pop(name, None)
    names = [n for n in _FORWARDED if n in env]
    cmd = mpirun_command(mpirun, ds.python or sys.executable, spec_path, hosts, ranks_per_host, names, ds.mpirun_args)
    log_path = folder / "mpirun.log"
    with open(log_path, "ab") as log:
        log.write(f"\n=== {datetime.now(UTC).isoformat(timespec='seconds')} {' '.join(cmd)}\n".encode())
        log.flush()
        process = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    _CHILDREN[process.pid] = process
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
        log_path=str(log_path),
        spec_path=str(spec_path),
        started_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    write_json(folder / "cluster.json", cluster.model_dump(mode="json"))
    # Kept after a stop: a restart relaunches the same hosts with the same spec.
    write_json(folder / "placement.json", {"hosts": hosts, "ranks_per_host": ranks_per_host})
    return cluster


def relaunch(settings: Settings, app_name: str, spec: DeepSpeedSpec) -> LaunchedCluster:
    """Stop whatever runs of the app's job and launch it again where it ran (a fresh rendezvous port)."""
    placement = cluster_dir(settings, app_name) / "placement.json"
    if not placement.exists():
        raise ClusterUnavailable(f"DeepSpeed app {app_name} was never launched here; deploy it first")
    where = read_json(placement)
    stop_cluster(settings, app_name)
    return launch(spec, where["hosts"], where["ranks_per_host"], settings)


_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def read_cluster(settings: Settings, app_name: str) -> LaunchedCluster | None:
    path = cluster_dir(settings, app_name) / "cluster.json"
    if not path.exists():
        return None
    return LaunchedCluster.model_validate_json(path.read_text())


def launched_apps(settings: Settings) -> set[str]:
    """Apps with a launched job on record (running or not)."""
    if not settings.state.deepspeed.exists():
        return set()
    return {p.parent.name for p in settings.state.deepspeed.glob("*/cluster.json")}


def exit_code(cluster: LaunchedCluster) -> int | None:
    """mpirun's exit status, or None while it runs (-1: gone, status unknown to this process)."""
    child = _CHILDREN.get(cluster.pid)
    if child is not None:
        return child.poll()
    import psutil

    try:
        proc = psutil.Process(cluster.pid)
        if proc.status() == psutil.STATUS_ZOMBIE or "mpirun" not in " ".join(proc.cmdline()):
            return -1
    except psutil.Error:
        return -1
    return None


def health(cluster: LaunchedCluster, timeout_s: float = 2.0) -> dict[str, Any]:
    """Rank 0's ``/health`` (per-rank heartbeats), or why it cannot be read."""
    import httpx

    try:
        response = httpx.get(f"{cluster.endpoint}/health", timeout=timeout_s)
        return response.json()
    except (httpx.HTTPError, ValueError) as e:
        return {"ready": False, "problems": [f"rank 0 does not answer at {cluster.endpoint} ({type(e).__name__})"]}


def log_tail(cluster: LaunchedCluster, lines: int = 40) -> str:
    return _tail(Path(cluster.log_path), lines)


def app_log(settings: Settings, app_name: str, lines: int = 40) -> str | None:
    """The last ``lines`` of the app's mpirun output (every rank's), None if it was never launched."""
    path = cluster_dir(settings, app_name) / "mpirun.log"
    return _tail(path, lines) if path.exists() else None


def _tail(path: Path, lines: int) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def worker_error(cluster: LaunchedCluster) -> str | None:
    """The first ``nodewise-worker error:`` line of the current launch, if a rank wrote one."""
    text = Path(cluster.log_path).read_text(errors="replace") if Path(cluster.log_path).exists() else ""
    current = text.rsplit("\n=== ", 1)[-1]
    for line in current.splitlines():
        if ERROR_MARK in line:
            return line.split(ERROR_MARK, 1)[1].strip()
    return None


def wait_ready(cluster: LaunchedCluster, timeout_s: float) -> dict[str, Any]:
    """Block until every rank is ready; raise ``DeployFailed`` if mpirun exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        code = exit_code(cluster)
        if code is not None:
            reason = worker_error(cluster) or f"mpirun exited with status {code}: {_last_line(cluster)}"
            raise DeployFailed(f"the DeepSpeed ranks did not start: {reason} (log: {cluster.log_path})")
        last = health(cluster)
        if last.get("ready"):
            return last
        time.sleep(0.2)
    problems = "; ".join(last.get("problems", [])) or "no answer"
    raise DeployFailed(
        f"the DeepSpeed ranks were not ready within {timeout_s:.0f} s ({problems}); raise "
        f"NODEWISE_DEEPSPEED__READY_TIMEOUT_S or see {cluster.log_path}"
    )


def _last_line(cluster: LaunchedCluster) -> str:
    tail = [line for line in log_tail(cluster, 20).splitlines() if line.strip()]
    return tail[-1][:300] if tail else "no output"


def stop_cluster(settings: Settings, app_name: str) -> list[str]:
    """Stop every process of the app's job and remove its shared memory; idempotent."""
    cluster = read_cluster(settings, app_name)
    folder = cluster_dir(settings, app_name)
    # Also any mpirun of this app that no record names: a launcher killed between starting it and
    # recording it (a watchdog killed mid-restart) must not leave a second group running.
    sessions = set(job_sessions(folder / "spec.json"))
    if cluster is not None:
        sessions.add(cluster.pid)
    if cluster is None and not sessions:
        return []
    killed = sum(_stop_session(sid, settings.deepspeed.stop_grace_s) for sid in sorted(sessions))
    done = [f"stopped DeepSpeed app {app_name} ({killed} process(es))"] if killed else []
    # mpirun cannot clean up after ranks it killed: their shm all-reduce buffers stay behind.
    for path in local_shm_files(cluster.master_addr, cluster.master_port) if cluster else []:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    _remove_rendezvous_files(folder)
    (cluster_dir(settings, app_name) / "cluster.json").unlink(missing_ok=True)
    _CHILDREN.pop(cluster.pid, None)
    return done


def job_sessions(spec_path: Path) -> list[int]:
    """The mpirun sessions on this machine running the job of ``spec_path`` (each mpirun leads its own)."""
    import psutil

    marker = str(spec_path)
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error, OSError):
            if marker in (proc.info["cmdline"] or []) and os.getsid(proc.info["pid"]) == proc.info["pid"]:
                found.append(proc.info["pid"])
    return sorted(found)


def _remove_rendezvous_files(folder: Path) -> None:
    """The file store the ranks of a one-machine job met through (serving/dist_env.py)."""
    for path in folder.glob(RENDEZVOUS_PREFIX + "*"):
        path.unlink(missing_ok=True)


def _stop_session(sid: int, grace_s: float) -> int:
    """SIGTERM every process of session ``sid`` (mpirun and its ranks), SIGKILL what remains."""
    stopped = stop_processes(lambda: session_members(sid), grace_s)
    child = _CHILDREN.get(sid)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=5)
    return stopped
