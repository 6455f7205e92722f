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
import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from nodewise.core.errors import ClusterUnavailable, DeployFailed, NotEnoughHosts
from nodewise.core.procs import free_port, port_open, session_members, stop_processes
from nodewise.core.runtime import SOURCE_ROOT, library_environment
from nodewise.core.settings import Settings
from nodewise.core.state import atomic_write, read_json, write_json
from serving._lm import local_shm_files
from serving.dist_env import RENDEZVOUS_PREFIX, is_local_host
from serving.spec import ERROR_MARK, SPEC_ENV, DeepSpeedSpec
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
    remote_shell: str = "ssh",
    launch_id: str = "",
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
    else:
        cmd += ["--mca", "plm_rsh_agent", remote_shell]  # how mpirun starts its daemon on each host
        # Open MPI 4.1's daemon on another host maps hwloc's topology at "the biggest hole" of its
        # address space and now and then segfaults there (hwloc_shmem_topology_write, mpirun then
        # exits 139; seen in 1 of ~15 cross-host launches here). The ranks are not bound to cores
        # (--bind-to none), so they need no shared topology: skip it.
        cmd += ["--mca", "rtc_hwloc_vmhole", "none"]
    for name in env_names:
        cmd += ["-x", name]
    worker = [python, "-m", "serving.deepspeed_worker", str(spec_path)]
    return [*cmd, *extra, *worker, *([f"--launch={launch_id}"] if launch_id else [])]


def launch(
    spec: DeepSpeedSpec, hosts: list[str], ranks_per_host: int, settings: Settings, spares: list[str] | None = None
) -> LaunchedCluster:
    """Start the ranks under mpirun and record them; returns at once (see ``wait_ready``).

    ``spares``: other hosts able to take a host's place when one is down at a restart.
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
    master_port = ds.master_port or free_port()
    folder = cluster_dir(settings, spec.app_name)
    folder.mkdir(parents=True, exist_ok=True)
    spec_path = folder / "spec.json"
    atomic_write(spec_path, spec.model_dump_json(indent=2))
    _remove_rendezvous_files(folder)  # a killed launch's file would confuse this one's ranks
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


class Placement(BaseModel):
    """Where the app's ranks run, and which other hosts may stand in for one that is down."""

    hosts: list[str]
    ranks_per_host: int
    spares: list[str] = []


def read_placement(settings: Settings, app_name: str) -> Placement:
    path = cluster_dir(settings, app_name) / "placement.json"
    if not path.exists():
        raise ClusterUnavailable(f"DeepSpeed app {app_name} was never launched here; deploy it first")
    return Placement.model_validate(read_json(path))


def host_down(host: str, settings: Settings) -> str | None:
    """Why ``host`` cannot take ranks now (the remote shell cannot run ``true`` on it), None if it can."""
    if is_local_host(host):
        return None
    ds = settings.deepspeed
    argv = [*shlex.split(ds.remote_shell), host, "true"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=ds.host_check_timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return f"{host} did not answer `{ds.remote_shell} {host} true` within {ds.host_check_timeout_s:.0f} s"
    except OSError as e:
        return f"remote shell {ds.remote_shell!r} cannot run ({e.strerror}); set NODEWISE_DEEPSPEED__REMOTE_SHELL"
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or [f"status {done.returncode}"])[-1][:200]
        return f"{host} is unreachable through {ds.remote_shell!r} ({why})"
    return None


def choose_hosts(placement: Placement, settings: Settings) -> tuple[list[str], dict[str, str]]:
    """The hosts a relaunch uses: the current ones that are up, then spares in order, as many as before.

    Returns them and why each skipped host is down. Raises ``NotEnoughHosts`` when too few are up.
    """
    wanted = len(placement.hosts)
    chosen: list[str] = []
    down: dict[str, str] = {}
    for host in [*placement.hosts, *placement.spares]:
        if len(chosen) == wanted:
            break
        why = host_down(host, settings)
        if why is None:
            chosen.append(host)
        else:
            down[host] = why
    if len(chosen) < wanted:
        raise NotEnoughHosts(
            f"not enough nodes: the job needs {wanted} host(s) and only {len(chosen)} of "
            f"{len(placement.hosts) + len(placement.spares)} answer (down: {', '.join(down)}); it is "
            "relaunched when one comes back, or add a spare node of the same kind to the inventory",
            down=down,
        )
    return chosen, down


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
    """mpirun's exit status, or None while it runs (-1: gone, status unknown)."""
    record = _exit_record(cluster)  # written by the supervisor as mpirun exits (each launch removes it)
    if record is not None:
        return int(record["status"])
    child = _CHILDREN.get(cluster.pid)
    if child is not None:
        return child.poll()
    import psutil

    try:
        proc = psutil.Process(cluster.pid)
        command = " ".join(proc.cmdline())
        if proc.status() != psutil.STATUS_ZOMBIE and ("tasks.mpi.supervise" in command or "mpirun" in command):
            return None
    except psutil.Error:
        pass
    record = _exit_record(cluster)  # it may have exited since the first look
    return int(record["status"]) if record is not None else -1


def exited_at(cluster: LaunchedCluster) -> float | None:
    """When mpirun exited by itself (epoch seconds, from the supervisor's record), None if it did not."""
    record = _exit_record(cluster)
    return None if record is None or record.get("stopped") else float(record["t"])


def _exit_record(cluster: LaunchedCluster) -> dict[str, Any] | None:
    """The supervisor's ``exit.json`` for this launch: status, time, whether it was a stop."""
    with contextlib.suppress(OSError, ValueError):
        record = json.loads((Path(cluster.spec_path).parent / EXIT_FILE).read_text())
        if isinstance(record, dict) and "status" in record and "t" in record:
            return record
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
    tail = [
        line
        for line in log_tail(cluster, 20).splitlines()
        if line.strip() and not line.startswith("nodewise: mpirun exited")  # the supervisor's own line
    ]
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
    if cluster is not None:
        done += stop_remote_ranks(settings, dict.fromkeys(cluster.hosts, cluster.launch_id), cluster.spec_path)
    # mpirun cannot clean up after ranks it killed: their shm all-reduce buffers stay behind.
    for path in local_shm_files(cluster.master_addr, cluster.master_port) if cluster else []:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    _remove_rendezvous_files(folder)
    (cluster_dir(settings, app_name) / "cluster.json").unlink(missing_ok=True)
    _CHILDREN.pop(cluster.pid, None)
    return done


def stop_remote_ranks(settings: Settings, launches: dict[str, str], spec_path: str) -> list[str]:
    """Kill ranks of the job's launches left on other hosts (``{host: launch id}``): mpirun killed
    hard, or a host cut off when it stopped.

    Through the remote shell, by the launch's command line (a later launch on the same host is
    spared); a host that does not answer is noted in ``leftovers.json`` and tried again at the
    next stop or watchdog pass (``clean_leftovers``).
    """
    folder = Path(spec_path).parent
    pending = _leftovers(folder)
    pending.update({h: launch for h, launch in launches.items() if not is_local_host(h)})
    if not pending:
        return []
    ds = settings.deepspeed
    still: dict[str, str] = {}
    for host, launch in sorted(pending.items()):
        # "[s]erving": the pattern matches the ranks, not the shell that runs pkill with it
        pattern = f"[s]erving.deepspeed_worker {spec_path}" + (f" --launch={launch}" if launch else "")
        argv = [*shlex.split(ds.remote_shell), host, f"pkill -KILL -f -- {shlex.quote(pattern)}; true"]
        try:
            ok = subprocess.run(argv, capture_output=True, timeout=ds.host_check_timeout_s, check=False).returncode == 0
        except (subprocess.TimeoutExpired, OSError):
            ok = False
        if not ok:
            still[host] = launch
    if not still:
        (folder / LEFTOVERS).unlink(missing_ok=True)
        return []
    write_json(folder / LEFTOVERS, still)
    return [f"could not reach {', '.join(still)} to stop ranks left there; tried again at the next pass"]


def clean_leftovers(settings: Settings, app_name: str) -> list[str]:
    """Stop ranks an earlier stop could not reach (a host that was cut off and is back)."""
    folder = cluster_dir(settings, app_name)
    before = _leftovers(folder)
    if not before:
        return []
    notes = stop_remote_ranks(settings, {}, str(folder / "spec.json"))
    cleaned = sorted(set(before) - set(_leftovers(folder)))
    return [f"stopped ranks left on {', '.join(cleaned)}"] if cleaned else notes


def _leftovers(folder: Path) -> dict[str, str]:
    path = folder / LEFTOVERS
    return {str(k): str(v) for k, v in read_json(path).items()} if path.exists() else {}


LEFTOVERS = "leftovers.json"


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
