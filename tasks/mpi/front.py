"""A DeepSpeed deployment's front process (serving/front.py): started with the group, kept across
the watchdog's restarts of it, stopped by ``nodewise down``.

Recorded in ``<state>/deepspeed/<app>/front.json`` (pid, ports, endpoint); its output goes to
``front.log`` beside mpirun's. The front listens on the deployment's port (``deepspeed.port``,
loopback when the ranks are local) and rank 0 moves to a port of its own (``deepspeed.rank0_port``,
else a free port chosen once and kept, so a restarted group answers where the front expects it).
The front reads rank 0's address from the group's record (``cluster.json``) as it changes: a
restart that puts rank 0 on a spare host is followed without restarting the front.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel

from nodewise.core.errors import ClusterUnavailable
from nodewise.core.procs import free_port, port_open, session_members, stop_processes
from nodewise.core.runtime import SOURCE_ROOT
from nodewise.core.settings import Settings
from nodewise.core.state import read_json, write_json
from serving.dist_env import is_local_host, route_source

FRONT_FILE = "front.json"
CLUSTER_FILE = "cluster.json"  # the group's record (tasks/mpi/records.py): its endpoint is rank 0's address
START_TIMEOUT_S = 20.0


class FrontProcess(BaseModel):
    """What was started for one app's front, as recorded in ``front.json``."""

    app_name: str
    pid: int  # leads a session of its own
    host: str
    port: int
    upstream: str  # rank 0's address (the front follows the group's record when a restart moves it)
    endpoint: str  # what users call: an address of this machine that reaches the front
    log_path: str
    record: str | None = None  # the group's record it follows (a front started without one is replaced)


def _folder(settings: Settings, app_name: str) -> Path:
    return settings.state.deepspeed_job(app_name)


def read_front(settings: Settings, app_name: str) -> FrontProcess | None:
    path = _folder(settings, app_name) / FRONT_FILE
    return FrontProcess.model_validate(read_json(path)) if path.exists() else None


def rank0_port(settings: Settings, app_name: str) -> int:
    """Rank 0's port behind the front: the setting, else the one this app's front already uses, else a free one."""
    if settings.deepspeed.rank0_port:
        return settings.deepspeed.rank0_port
    front = read_front(settings, app_name)
    if front is not None:
        return int(front.upstream.rsplit(":", 1)[1])
    return free_port()


def ensure_front(settings: Settings, app_name: str, host: str, upstream: str) -> FrontProcess:
    """The app's front, running and proxying to ``upstream``: the one already there, else a new one.

    Raises:
        ClusterUnavailable: the deployment's port is taken, or the front did not start.
    """
    front = read_front(settings, app_name)
    if (
        front is not None
        and (front.host, front.port) == (host, settings.deepspeed.port)
        and front.record
        and _alive(front)
    ):
        return follow(settings, app_name, upstream) or front  # it reads rank 0's new address from the record
    stop_front(settings, app_name)
    ds = settings.deepspeed
    if port_open("127.0.0.1", ds.port):
        raise ClusterUnavailable(
            f"port {ds.port} (the deployment's endpoint) is already in use by something else; set "
            "NODEWISE_DEEPSPEED__PORT to a free port"
        )
    folder = _folder(settings, app_name)
    log_path = folder / "front.log"
    command = [sys.executable, "-m", "serving.front", "--upstream", upstream, "--host", host]
    command += ["--port", str(ds.port), "--app", app_name]
    command += ["--hold-timeout-s", str(ds.hold_timeout_s), "--max-held", str(ds.max_held)]
    record = folder / CLUSTER_FILE
    command += ["--record", str(record)]
    env = _environment()
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    front = FrontProcess(
        app_name=app_name,
        pid=process.pid,
        host=host,
        port=ds.port,
        upstream=upstream,
        endpoint=f"http://{endpoint_host(host, upstream)}:{ds.port}",
        log_path=str(log_path),
        record=str(record),
    )
    _wait_listening(process, front)
    write_json(folder / FRONT_FILE, front.model_dump())
    return front


def endpoint_host(bind: str, upstream: str) -> str:
    """The address users reach a front listening on ``bind`` at, rank 0 being at ``upstream``.

    As rank 0's endpoint was chosen before the front (tasks/mpi/launcher.py: loopback when the
    ranks are local, else rank 0's host): loopback for a loopback bind; the bind itself when it
    names one address; for a wildcard bind, this machine as the hosts see it: rank 0's host if it
    is this machine, else this machine's address on the route to it (the network the ranks share;
    never loopback, which no other machine can use), else this machine's name.
    """
    if _loopback(bind):
        return "127.0.0.1"
    if bind not in ("0.0.0.0", "::", ""):
        return bind
    rank0 = urlsplit(upstream).hostname or ""
    if is_local_host(rank0):
        found: str | None = rank0
    else:
        found = route_source(rank0) if rank0 else None
    return found if found and not _loopback(found) else socket.getfqdn()


def _loopback(host: str) -> bool:
    return host.startswith("127.") or host in ("localhost", "::1")


def follow(settings: Settings, app_name: str, upstream: str) -> FrontProcess | None:
    """Note rank 0's new address in ``front.json`` (the front itself reads it from the group's
    record); returns the updated record, None without a front."""
    front = read_front(settings, app_name)
    if front is None:
        return None
    if front.upstream != upstream:
        front = front.model_copy(update={"upstream": upstream})
        write_json(_folder(settings, app_name) / FRONT_FILE, front.model_dump())
    return front


def _environment() -> dict[str, str]:
    import os

    path = os.pathsep.join(p for p in (str(SOURCE_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


def _wait_listening(process: subprocess.Popen[bytes], front: FrontProcess) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not port_open("127.0.0.1", front.port):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            last = Path(front.log_path).read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise ClusterUnavailable(f"the deployment's front did not start on port {front.port}: {last[0][:300]}")
        time.sleep(0.05)


def _alive(front: FrontProcess) -> bool:
    return bool(session_members(front.pid))


def stop_front(settings: Settings, app_name: str) -> list[str]:
    """Stop the app's front (idempotent); returns what was done."""
    front = read_front(settings, app_name)
    if front is None:
        return []
    stopped = stop_processes(lambda: session_members(front.pid), settings.deepspeed.stop_grace_s)
    (_folder(settings, app_name) / FRONT_FILE).unlink(missing_ok=True)
    return [f"stopped the front of {app_name} (port {front.port})"] if stopped else []


def front_state(front: FrontProcess, timeout_s: float = 1.0) -> dict[str, Any] | None:
    """The front's ``GET /front`` (what it holds), None if it does not answer."""
    import httpx

    try:
        return httpx.get(f"{front.endpoint}/front", timeout=timeout_s).json()
    except (httpx.HTTPError, ValueError):
        return None


def hold_line(state: dict[str, Any]) -> str | None:
    """``holding 12 requests: group restarting, 9 s`` while the front holds, None while it serves."""
    if state.get("ready"):
        return None
    why = str(state.get("why") or "group not ready").split(" (", 1)[0]
    return f"holding {state.get('held', 0)} requests: {why}, {float(state.get('down_for_s', 0)):.0f} s"
