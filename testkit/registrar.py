"""Registering models from a separate process, as a user's script does (this process's MLflow globals
stay pointed at the test's own store), started once: each registration in a fresh interpreter paid
Python's, torch's and MLflow's imports again (several seconds each on a 2-core machine)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_MARK = "@@registered "

# Reads one JSON job a line, answers one marked JSON line: {"version": ...} or {"error": traceback}.
_LOOP = r"""
import json, sys, traceback
import mlflow

def register(job):
    mlflow.set_tracking_uri(job["tracking_uri"])
    mlflow.set_registry_uri(job["tracking_uri"])
    if job["kind"] == "demo-retrained":
        from nodewise.demo_models import register_demo_model
        return register_demo_model(job["root"], alias="staging", retrain=True).version
    from testkit.models import BrokenOnLoad, DoubleIt, register_pyfunc
    model = {"double-it": DoubleIt, "broken-on-load": BrokenOnLoad}[job["kind"]]()
    return register_pyfunc(model, job["name"], job["root"]).rsplit("/", 1)[1]

for line in sys.stdin:
    try:
        answer = {"version": str(register(json.loads(line)))}
    except Exception:
        answer = {"error": traceback.format_exc()[-3000:]}
    print(MARK + json.dumps(answer), flush=True)
""".replace("MARK", repr(_MARK))


class Registrar:
    """One long-lived registering process; ``register`` may be called from any thread."""

    def __init__(self) -> None:
        self._log = tempfile.NamedTemporaryFile(prefix="nw-registrar-", suffix=".log", delete=False)  # noqa: SIM115
        self._proc: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()

    def register(self, kind: str, tracking_uri: str, root: str, name: str = "nodewise-digits") -> str:
        """Register a version through ``tracking_uri``; returns its version. ``kind``: ``demo-retrained``
        (the demo digits model, retrained, alias staging), ``double-it`` or ``broken-on-load`` (pyfuncs)."""
        job = {"kind": kind, "tracking_uri": tracking_uri, "root": root, "name": name}
        with self._lock:
            proc = self._started()
            assert proc.stdin is not None
            assert proc.stdout is not None
            proc.stdin.write(json.dumps(job) + "\n")
            proc.stdin.flush()
            for line in proc.stdout:
                if line.startswith(_MARK):
                    answer = json.loads(line.removeprefix(_MARK))
                    break
            else:
                raise AssertionError(f"the registering process ended: {Path(self._log.name).read_text()[-3000:]}")
        assert "error" not in answer, answer["error"]
        return answer["version"]

    def _started(self) -> subprocess.Popen[str]:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _LOOP],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._log,
                text=True,
                cwd=ROOT,
            )
        return self._proc

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)
