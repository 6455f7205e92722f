"""Processes and ports, one way each: stop (signal, wait, SIGKILL what is left), probe, pick a free port.

Used by the local Ray instance, the DeepSpeed launcher and ``nodewise up``/``down``.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
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
        _, alive = psutil.wait_procs(alive, timeout=grace_s / len(signals))
        if not alive:
            break
    leftovers = {p.pid: p for p in [*alive, *find()]}
    for proc in leftovers.values():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            proc.kill()
    psutil.wait_procs(list(leftovers.values()), timeout=5)
    return len(procs)


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


def free_port_block(size: int = 4) -> int:
    """A base port with ``size`` consecutive free ports on 127.0.0.1 (Ray's instance uses 4)."""
    for _ in range(200):
        base = random.randrange(20000, 29000)  # below Serve's direct-ingress ports (30000+)
        if all(_bindable(base + i) for i in range(size)):
            return base
    raise RuntimeError("no free port block")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
