"""The Ray cluster Serve runs on: an existing one, or a local instance started on demand.

The local instance is ours: its processes are recorded at start (``cluster.json`` in the
state folder) so that ``nodewise down`` stops exactly them and nothing else on the machine
(``ray stop`` would stop every Ray on the host).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from nodewise.core.errors import ClusterUnavailable
from nodewise.core.runtime import haproxy_dir, library_environment, ray_temp_dir
from nodewise.core.settings import Settings


class RayCluster(BaseModel):
    """How to reach the cluster, and whether nodewise owns it."""

    address: str
    owned: bool
    temp_dir: str | None = None
    pids: list[int] = []


def _record_path(settings: Settings) -> Path:
    return settings.ray_dir / "cluster.json"


def read_local_cluster(settings: Settings) -> RayCluster | None:
    """The local instance nodewise started, if one is recorded and still listening."""
    path = _record_path(settings)
    if not path.exists():
        return None
    cluster = RayCluster.model_validate_json(path.read_text())
    if not _port_open("127.0.0.1", settings.ray.port):
        return None
    return cluster


def ensure_cluster(settings: Settings) -> RayCluster:
    """The configured cluster, or the local instance (started if it is not running)."""
    if settings.ray.address:
        return RayCluster(address=settings.ray.address, owned=False)
    existing = read_local_cluster(settings)
    if existing is not None:
        return existing
    return start_local_cluster(settings)


def start_local_cluster(settings: Settings) -> RayCluster:
    """Start a head node on this machine, recording its processes."""
    port = settings.ray.port
    if _port_open("127.0.0.1", port):
        raise ClusterUnavailable(
            f"port {port} is already in use by something nodewise did not start; set "
            "NODEWISE_RAY__PORT to a free port, or NODEWISE_RAY__ADDRESS to use that cluster"
        )
    temp_dir = ray_temp_dir(settings)
    temp_dir.mkdir(parents=True, exist_ok=True)
    ray_bin = Path(sys.executable).with_name("ray")
    cmd = [
        str(ray_bin),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        f"--num-cpus={settings.ray.num_cpus or os.cpu_count() or 1}",
        f"--temp-dir={temp_dir}",
        f"--include-dashboard={'true' if settings.ray.include_dashboard else 'false'}",
        "--dashboard-host=127.0.0.1",
        "--disable-usage-stats",
        # Ray's other fixed ports (10001, 52365, 8265) would collide with any other Ray here.
        f"--ray-client-server-port={port + 1}",
        f"--dashboard-agent-listen-port={port + 2}",
        f"--dashboard-port={port + 3}",
        f"--object-store-memory={settings.ray.object_store_memory_bytes}",
    ]
    env = {**os.environ, **library_environment(settings)}
    log = settings.ray_dir / "start.log"
    with log.open("w") as out:
        try:
            proc = subprocess.run(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=settings.ray.start_timeout_s, check=False
            )
        except subprocess.TimeoutExpired as e:
            raise ClusterUnavailable(
                f"local Ray did not start within {settings.ray.start_timeout_s:.0f} s; see {log}"
            ) from e
    if proc.returncode != 0:
        raise ClusterUnavailable(f"`ray start` failed (exit {proc.returncode}); see {log}")
    cluster = RayCluster(
        address=f"127.0.0.1:{port}", owned=True, temp_dir=str(temp_dir), pids=_processes_of(temp_dir, port)
    )
    _record_path(settings).write_text(cluster.model_dump_json(indent=2))
    return cluster


def connect(cluster: RayCluster, namespace: str = "nodewise") -> None:
    """Connect this process to ``cluster`` as a driver (no-op if already connected)."""
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(
            address=cluster.address,
            namespace=namespace,
            logging_level="ERROR",
            log_to_driver=False,
            configure_logging=False,
        )
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ClusterUnavailable(
            f"could not connect to the Ray cluster at {cluster.address} ({str(e).splitlines()[0]}); "
            "check NODEWISE_RAY__ADDRESS, and RAY_AUTH_MODE/RAY_AUTH_TOKEN if it uses token auth"
        ) from e


def stop_local_cluster(settings: Settings, timeout_s: float = 15.0) -> bool:
    """Stop the local instance nodewise started (only its own processes). Returns whether it ran."""
    import psutil

    path = _record_path(settings)
    if not path.exists():
        return False
    cluster = RayCluster.model_validate_json(path.read_text())
    pids = set(cluster.pids) | set(_processes_of(Path(cluster.temp_dir or "/nonexistent"), settings.ray.port))
    pids |= set(_processes_of(haproxy_dir(settings), settings.ray.port))  # HAProxy, started by Serve
    procs = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            procs.extend([proc, *proc.children(recursive=True)])
        except psutil.NoSuchProcess:
            continue
    for proc in procs:
        _signal(proc, signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for proc in alive:
        _signal(proc, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=5)
    path.unlink(missing_ok=True)
    shutil.rmtree(haproxy_dir(settings), ignore_errors=True)  # its sockets and config die with it
    return bool(procs)


def _signal(proc: object, sig: int) -> None:
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
        proc.send_signal(sig)  # type: ignore[attr-defined]


def _processes_of(temp_dir: Path, port: int) -> list[int]:
    """PIDs of the Ray processes that belong to the instance using ``temp_dir`` and ``port``."""
    import psutil

    marker = str(temp_dir)
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if marker in cmdline or ("ray.util.client.server" in cmdline and f":{port} " in cmdline + " "):
            found.append(proc.info["pid"])
    return found


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


@task(name="ensure-ray-cluster", cache_policy=NO_CACHE, timeout_seconds=180)
def ensure_cluster_task(settings: Settings) -> RayCluster:
    """Reach the configured Ray cluster, or start the local one; connect this process."""
    cluster = ensure_cluster(settings)
    connect(cluster)
    return cluster
