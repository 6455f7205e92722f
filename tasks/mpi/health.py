"""How a launched DeepSpeed job is doing, read from here: mpirun's status, rank 0's health, the log.

``exit_code`` / ``exited_at``: from the supervisor's exit record, else the child this process
started, else the process table. ``health``: rank 0's ``/health``. ``log_tail`` / ``app_log``:
mpirun's output (every rank's). ``worker_error``: the ``nodewise-worker error:`` line
(``serving.spec.ERROR_MARK``) of the current launch. ``wait_ready``: blocks until every rank is
ready, raising ``DeployFailed`` with the reason if mpirun exits or time runs out. Nothing here
starts or stops a process.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from nodewise.core.errors import DeployFailed
from nodewise.core.settings import Settings
from serving.spec import ERROR_MARK
from tasks.mpi.records import CHILDREN, LaunchedCluster, cluster_dir, exit_record


def exit_code(cluster: LaunchedCluster) -> int | None:
    """mpirun's exit status, or None while it runs (-1: gone, status unknown)."""
    record = exit_record(cluster)  # written by the supervisor as mpirun exits (each launch removes it)
    if record is not None:
        return int(record["status"])
    child = CHILDREN.get(cluster.pid)
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
    record = exit_record(cluster)  # it may have exited since the first look
    return int(record["status"]) if record is not None else -1


def exited_at(cluster: LaunchedCluster) -> float | None:
    """When mpirun exited by itself (epoch seconds, from the supervisor's record), None if it did not."""
    record = exit_record(cluster)
    return None if record is None or record.get("stopped") else float(record["t"])


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
