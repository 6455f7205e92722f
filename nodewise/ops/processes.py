"""A state folder's processes (Ray's, HAProxy's, the DeepSpeed ranks') and what they listen on,
and removing a state folder with the folders kept outside it."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import psutil

from nodewise.core.settings import Settings


def remove_state(state: Path | str) -> None:
    """The state folder, and Ray's and HAProxy's folders in /tmp when its path was too long for sockets."""
    settings = Settings(state_dir=Path(state))
    for folder in (Path(state), settings.state.ray_temp, settings.state.haproxy):
        shutil.rmtree(folder, ignore_errors=True)


def ray_processes(state: str) -> list[int]:
    """Ray's, HAProxy's and the DeepSpeed ranks' processes of the state folder ``state``."""
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
    """Whether ``ip`` (as psutil reports a listening address) is a loopback address."""
    return ip.startswith(("127.", "::ffff:127.")) or ip == "::1"
