"""The CLI as a user runs it: a user's environment (own state folder, free ports, own home), the
processes of a state folder and what they listen on, and removing a state folder."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

from tests.support.ports import free_port_block

NODEWISE = str(Path(sys.executable).with_name("nodewise"))


def user_environment(prefix: str) -> tuple[Path, dict[str, str]]:
    """A fresh state folder and free ports, as a user's shell would set them; nothing of the tests'."""
    state = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    base = free_port_block(6)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "NODEWISE_"))}
    env.update(
        {
            "NODEWISE_STATE_DIR": str(state),
            "NODEWISE_RAY__PORT": str(base),
            "NODEWISE_SERVE__PORT": str(base + 4),
            "NODEWISE_SERVE__REPLICAS": "1",
            "NODEWISE_DEEPSPEED__PORT": str(base + 5),
            # DeepSpeed's compiled op, built once per test run (a user's machine builds it once too).
            "NODEWISE_DEEPSPEED__OP_CACHE_DIR": os.environ["TORCH_EXTENSIONS_DIR"],
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "HOME": str(state / "home"),  # a user's home: nothing of nodewise's libraries may land in it
        }
    )
    (state / "home").mkdir()
    return state, env


def remove_state(state: Path | str) -> None:
    """The state folder, and Ray's and HAProxy's folders in /tmp when its path was too long for sockets."""
    from nodewise.core.settings import Settings

    settings = Settings(state_dir=Path(state))
    for folder in (Path(state), settings.state.ray_temp, settings.state.haproxy):
        shutil.rmtree(folder, ignore_errors=True)


def run(env: dict[str, str], *args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    return subprocess.run([NODEWISE, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)


def ray_processes(state: str) -> list[int]:
    """Ray's, HAProxy's and the DeepSpeed ranks' processes of the state folder ``state``."""
    from nodewise.core.settings import Settings

    settings = Settings(state_dir=Path(state))
    markers = (state, str(settings.state.ray_temp), str(settings.state.haproxy))  # the ranks' spec is in state
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if any(marker in cmdline for marker in markers):
            found.append(proc.info["pid"])
    return found


def listening(state: str) -> dict[int, tuple[str, str]]:
    """Every TCP port that a process of the state folder ``state`` (or a child of one) listens on:
    port -> (process name, address)."""
    pids: set[int] = set()
    for pid in ray_processes(state):
        with contextlib.suppress(psutil.Error):
            pids |= {pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))}
    found = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    found[conn.laddr.port] = (proc.name(), conn.laddr.ip)
    return found


def loopback(ip: str) -> bool:
    return ip.startswith(("127.", "::ffff:127.")) or ip == "::1"
