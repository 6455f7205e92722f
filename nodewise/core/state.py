"""The state folder (``NODEWISE_STATE_DIR``, default ``.nodewise``): every path in it, and how its
files are written.

One module owns both, so no caller joins a path by hand or writes JSON its own way:

- ``StateFolder``: the path of everything nodewise keeps locally (``settings.state``).
- ``locked_json``: read-modify-write of a JSON file under an exclusive lock, replaced atomically.
- ``read_json`` / ``write_json`` / ``atomic_write``: the same files without the lock (a reader that
  tolerates a concurrent writer, or a file only one process writes).
- ``try_lock`` (non-blocking) and ``wait_lock`` (with a deadline): lock files.

A file that is not valid JSON is never silently reset: ``CorruptStateFile`` names it and how to
recover.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from nodewise.core.errors import CorruptStateFile, LockTimeout


class StateFolder:
    """Every path under the state folder. ``root`` is absolute; nothing is created here."""

    def __init__(self, root: Path, op_cache: Path | None = None) -> None:
        self.root = root
        self._op_cache = op_cache

    def __repr__(self) -> str:
        return f"StateFolder({str(self.root)!r})"

    # MLflow, Prefect, torch
    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def prefect_home(self) -> Path:
        return self.root / "prefect"

    @property
    def op_cache(self) -> Path:
        """DeepSpeed's compiled ops (TORCH_EXTENSIONS_DIR)."""
        return (self._op_cache or self.root / "torch_extensions").expanduser().resolve()

    # what is deployed, and what happened to it
    @property
    def records(self) -> Path:
        return self.root / "deployments.json"

    @property
    def k8s_records(self) -> Path:
        """What ``nodewise render --apply`` put on Kubernetes (the watchdog watches it there)."""
        return self.root / "k8s_deployments.json"

    @property
    def promotions(self) -> Path:
        return self.root / "promotions.json"

    @property
    def rollouts(self) -> Path:
        """Challengers beside their champions, and decisions being carried out (tasks/rollout/)."""
        return self.root / "rollouts.json"

    @property
    def poller(self) -> Path:
        return self.root / "poller.json"

    @property
    def webhook_deliveries(self) -> Path:
        return self.root / "webhook_deliveries.json"

    @property
    def watchdog(self) -> Path:
        return self.root / "watchdog.json"

    @property
    def watchdog_lock(self) -> Path:
        return self.root / "watchdog.lock"

    def deploy_lock(self, model_name: str) -> Path:
        """One deploy of a model at a time on this machine."""
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_name)
        return self.root / "locks" / f"deploy-{safe}.lock"

    # processes nodewise runs
    @property
    def ray(self) -> Path:
        return self.root / "ray"

    @property
    def ray_token(self) -> Path:
        return self.ray / "auth_token"

    @property
    def haproxy_launcher(self) -> Path:
        """The script Ray Serve starts HAProxy through (RAY_SERVE_HAPROXY_BINARY_PATH): it moves the
        stats and metrics pages off the wildcard address, then runs HAProxy."""
        return self.ray / "haproxy"

    @property
    def ray_cluster(self) -> Path:
        return self.ray / "cluster.json"

    @property
    def ray_temp(self) -> Path:
        """Ray's temp dir for the local instance (Ray appends ~65 characters of socket names)."""
        return self._short("tmp", 40)

    @property
    def haproxy(self) -> Path:
        """Ray Serve's HAProxy config, sockets and server state (not /tmp/haproxy-serve). Serve adds a
        56-character node id and the socket name; HAProxy takes socket paths under 97."""
        return self._short("hap", 24)

    @property
    def deepspeed(self) -> Path:
        return self.root / "deepspeed"

    def deepspeed_job(self, app_name: str) -> Path:
        """One DeepSpeed job's folder: cluster.json, spec.json, mpirun.log."""
        return self.deepspeed / app_name

    @property
    def prometheus(self) -> Path:
        """Metrics: ``targets/`` (Prometheus file-based service discovery, one file a deployment plus
        ``control.json``) and ``counts.json`` (the control plane's counters, kept across restarts)."""
        return self.root / "prometheus"

    @property
    def services(self) -> Path:
        """What ``nodewise up`` started: services.json and each service's log."""
        return self.root / "services"

    @property
    def demo_inventory(self) -> Path:
        return self.root / "demo-inventory.yaml"

    def _short(self, name: str, budget: int) -> Path:
        """``ray/NAME`` when its path has at most ``budget`` characters (sockets are created below it
        and AF_UNIX paths are short), else a per-state folder in /tmp."""
        preferred = self.ray / name
        if len(str(preferred)) <= budget:
            return preferred
        digest = hashlib.sha1(str(self.root).encode()).hexdigest()[:8]
        return Path("/tmp") / f"nw{name}-{digest}"


# -- JSON files ----------------------------------------------------------------------------------
def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path`` ({} when missing or empty); CorruptStateFile when it is not one."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except ValueError as e:
        raise CorruptStateFile(
            f"state file {path} is not valid JSON ({e}); restore it from a backup, or move it away "
            "to start that part of the state afresh (nodewise never resets it by itself)"
        ) from e
    if not isinstance(data, dict):
        raise CorruptStateFile(f"state file {path} holds a {type(data).__name__}, not an object; move it away")
    return data


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so a reader sees the old content or the new, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, json.dumps(data, indent=2, sort_keys=True))


@contextlib.contextmanager
def locked_json(path: Path) -> Iterator[dict[str, Any]]:
    """The object in ``path`` under an exclusive lock; what the block leaves in it is written back."""
    with _flock(path.with_suffix(".lock"), fcntl.LOCK_EX):
        data = read_json(path)
        yield data
        write_json(path, data)


@contextlib.contextmanager
def shared_json(path: Path) -> Iterator[dict[str, Any]]:
    """The object in ``path`` under a lock, for reading; nothing is written."""
    with _flock(path.with_suffix(".lock"), fcntl.LOCK_EX):
        yield read_json(path)


# -- lock files ----------------------------------------------------------------------------------
@contextlib.contextmanager
def try_lock(path: Path) -> Iterator[bool]:
    """True while this process holds the lock ``path``; False at once when another process does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def wait_lock(
    path: Path, timeout_s: float, what: str, poll_s: float = 0.5, on_wait: Callable[[], None] | None = None
) -> Iterator[None]:
    """Hold the lock ``path``, waiting for it up to ``timeout_s``; LockTimeout naming ``what`` after.
    ``on_wait`` is called once, when the lock is found held (to say that this one waits).

    Re-entrant within one thread (a promotion's run holds its model's lock and its deploy subflow
    takes it again); another thread or process waits."""
    key = (str(path.absolute()), threading.get_ident())
    with _HELD_GUARD:
        depth = _HELD.get(key, 0)
        _HELD[key] = depth + 1
    try:
        if depth:
            yield
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout_s
        with open(path, "w") as lock:
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if on_wait is not None:
                        on_wait()
                        on_wait = None
                    if time.monotonic() > deadline:
                        raise LockTimeout(f"{what} held its lock ({path}) for over {timeout_s:.0f} s") from None
                    time.sleep(poll_s)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    finally:
        with _HELD_GUARD:
            _HELD[key] -= 1
            if not _HELD[key]:
                del _HELD[key]


_HELD: dict[tuple[str, int], int] = {}  # wait_lock's locks this process holds, by (path, thread)
_HELD_GUARD = threading.Lock()


@contextlib.contextmanager
def _flock(path: Path, mode: int) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, mode)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
