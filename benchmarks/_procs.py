"""What the machine's processes did during a load point: Serve replicas alive over time and CPU
seconds per kind of process (replicas, the ingress, Ray's own processes, the load generator).

Read from /proc through psutil, so it needs no connection to Ray and sees a replica from the
moment its actor process starts (STARTING included), which Serve's own view does not name.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import psutil

# The first matching rule names a process's kind (Ray sets the process title of its actors).
KINDS = (
    ("replica", ("ray::ServeReplica",)),
    ("serve-proxy", ("ray::ProxyActor",)),
    ("haproxy", ("haproxy",)),
    ("serve-controller", ("ray::ServeController",)),
    ("ray-core", ("gcs_server", "raylet", "dashboard", "log_monitor", "runtime_env", "ray::IDLE", "monitor.py")),
    ("load", ("wrk",)),
)


def kind_of(proc: psutil.Process) -> str:
    try:
        text = " ".join(proc.cmdline()) or proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return "gone"
    for kind, needles in KINDS:
        if any(n in text for n in needles):
            return kind
    return "other"


class ProcSampler:
    """Samples every ``interval_s`` in a thread: replica processes alive (time, count), and each
    process's CPU time, summed per kind at the end (``cpu_s``: seconds of CPU over the window)."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.replicas: list[tuple[float, int]] = []
        self._start: dict[int, float] = {}
        self._last: dict[int, tuple[str, float]] = {}
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProcSampler:
        self._sample()
        self._start = {pid: cpu for pid, (_, cpu) in self._last.items()}
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        replicas = 0
        for proc in psutil.process_iter():
            try:
                times = proc.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            kind = kind_of(proc)  # each time: an idle Ray worker becomes a replica under the same pid
            if kind == "gone":
                continue
            self._last[proc.pid] = (kind, times.user + times.system)
            replicas += kind == "replica"
        self.replicas.append((round(time.monotonic() - self._t0, 1), replicas))

    def summary(self) -> dict:
        """CPU seconds per kind (a process's kind when last seen) over the window, and the replica
        processes (min, max, when the count changed)."""
        cpu: dict[str, float] = defaultdict(float)
        for pid, (kind, total) in self._last.items():
            cpu[kind] += total - self._start.get(pid, 0.0)
        changes = [self.replicas[0]] + [
            s for a, s in zip(self.replicas, self.replicas[1:], strict=False) if s[1] != a[1]
        ]
        counts = [n for _, n in self.replicas]
        return {
            "replicas_min": min(counts),
            "replicas_max": max(counts),
            "replica_changes": changes,  # (seconds into the point, replica processes alive)
            "cpu_s": {k: round(v, 1) for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]) if v >= 0.05},
        }
