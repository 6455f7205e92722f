"""Processes and ports, one way each: stop (signal, wait, SIGKILL what is left), probe, pick a free port.

Used by the local Ray instance, the DeepSpeed launcher and ``nodewise up``/``down``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any


def stop_processes(
    find: Callable[[], list[Any]],
    grace_s: float,
    signals: Sequence[int] = (signal.SIGTERM,),
) -> int:
    """Signal every process ``find`` returns (psutil.Process objects), wait up to ``grace_s`` after
    each signal, then SIGKILL what is still there, found again (children started meanwhile too).
    Returns how many processes were found at first."""
    import psutil

    procs = find()
    alive = list(procs)
    for sig in signals:
        for proc in alive:
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                proc.send_signal(sig)
        alive = _wait_gone(alive, grace_s / len(signals))
        if not alive:
            break
    leftovers = {p.pid: p for p in [*alive, *find()] if _running(p)}
    for proc in leftovers.values():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            proc.kill()
    _wait_gone(list(leftovers.values()), 5)
    return len(procs)


def _wait_gone(procs: list[Any], timeout_s: float) -> list[Any]:
    """Wait up to ``timeout_s`` for ``procs`` to end; those still running. A zombie has ended: its
    parent (often PID 1, for a daemon's children) reaps it when it will, and waiting for that
    would only wait out the timeout."""
    deadline = time.monotonic() + timeout_s
    alive = [p for p in procs if _running(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if _running(p)]
    return alive


def _running(proc: Any) -> bool:
    import psutil

    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def with_children(pids: Sequence[int]) -> list[Any]:
    """The processes ``pids`` and all their descendants that still run."""
    import psutil

    found = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc = psutil.Process(pid)
            found.extend([proc, *proc.children(recursive=True)])
    return found


def session_members(sid: int) -> list[Any]:
    """The live processes of session ``sid`` (a launcher started with ``start_new_session``)."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """Whether something accepts TCP connections at ``host:port``."""
    with socket.socket() as s:
        s.settimeout(timeout_s)
        return s.connect_ex((host, port)) == 0


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at ``host`` now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
