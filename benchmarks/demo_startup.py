"""Seconds from `nodewise demo --detach --no-lm` (the Ray Serve part) to the first prediction, cold and warm,
and peak memory.

cold: a fresh state folder (MLflow DB, Prefect DB migrations, training, Ray start, Serve app).
warm: the same state folder after `nodewise down` (model reused; Ray and Serve start again).
hot:  `nodewise deploy` of the same version while Ray is still up.
peer: `mlflow models serve` (--env-manager local) on the same registered version, until its
      first answered prediction.
Peak memory: the sum of RSS over every process of the run (the CLI's tree and the Ray
processes it starts, which are daemonised), sampled every 0.2 s.

Usage: .venv/bin/python benchmarks/demo_startup.py   (last line: one JSON object)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

BIN = Path(sys.executable).parent
GIB = 1024**3


class PeakRSS:
    """Samples the summed RSS of processes related to ``marker`` (a path in their command line)."""

    def __init__(self, marker: str, root_pid: int) -> None:
        self.marker, self.root_pid, self.peak = marker, root_pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(0.2)

    def _sample(self) -> int:
        procs: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if self.marker in " ".join(proc.info["cmdline"] or []):
                procs[proc.pid] = proc
        try:
            root = psutil.Process(self.root_pid)
            procs[root.pid] = root
        except psutil.NoSuchProcess:
            pass
        for proc in list(procs.values()):
            try:
                procs.update({c.pid: c for c in proc.children(recursive=True)})
            except psutil.NoSuchProcess:
                continue
        total = 0
        for proc in procs.values():
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total


def timed_cli(env: dict[str, str], marker: str, *args: str) -> dict[str, float]:
    """Run the CLI; seconds until the prediction line (or exit), total seconds, peak GiB."""
    start = time.monotonic()
    proc = subprocess.Popen(
        [str(BIN / "nodewise"), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    first = None
    with PeakRSS(marker, proc.pid) as rss:
        assert proc.stdout is not None
        for line in proc.stdout:
            if first is None and (line.startswith("prediction for") or line.startswith("deployed ")):
                first = time.monotonic() - start
        proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"nodewise {' '.join(args)} failed with exit {proc.returncode}")
    total = time.monotonic() - start
    return {
        "to_first_prediction_s": round(first or total, 1),
        "total_s": round(total, 1),
        "peak_rss_gib": round(rss.peak / GIB, 2),
    }


def mlflow_serve(env: dict[str, str], state: Path, port: int) -> dict[str, float]:
    """`mlflow models serve` on the demo model: seconds until it answers a prediction."""
    body = {"inputs": [[0.0] * 64]}
    log = (state / "mlflow-serve.log").open("w")
    start = time.monotonic()
    proc = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "models",
            "serve",
            "-m",
            "models:/nodewise-digits/1",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        # mlflow models serve execs `uvicorn` from PATH: the venv's bin must be on it.
        env={
            **env,
            "MLFLOW_TRACKING_URI": f"sqlite:///{state / 'mlflow.db'}",
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        },
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        with PeakRSS("mlflow", proc.pid) as rss:
            while time.monotonic() - start < 120 and proc.poll() is None:
                try:
                    if httpx.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        if proc.poll() is not None:
            tail = (state / "mlflow-serve.log").read_text()[-1500:]
            raise SystemExit(f"mlflow models serve exited with {proc.returncode} before answering:\n{tail}")
        return {"to_first_prediction_s": round(time.monotonic() - start, 1), "peak_rss_gib": round(rss.peak / GIB, 2)}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=30)
        log.close()


def main() -> None:
    state = Path(tempfile.mkdtemp(prefix="nw-bench-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NODEWISE_", "PREFECT_", "MLFLOW_"))}
    env.update({"NODEWISE_STATE_DIR": str(state), "NODEWISE_RAY__PORT": "26390", "NODEWISE_SERVE__PORT": "28000"})
    try:
        cold = timed_cli(env, str(state), "demo", "--detach", "--no-lm")
        hot = timed_cli(env, str(state), "deploy", "models:/nodewise-digits@champion")
        subprocess.run([str(BIN / "nodewise"), "down"], env=env, check=True, capture_output=True)
        warm = timed_cli(env, str(state), "demo", "--detach", "--no-lm")
        subprocess.run([str(BIN / "nodewise"), "down"], env=env, check=True, capture_output=True)
        peer = mlflow_serve(env, state, 28100)
    finally:
        subprocess.run([str(BIN / "nodewise"), "down"], env=env, check=False, capture_output=True)
        shutil.rmtree(state, ignore_errors=True)
    print(
        json.dumps(
            {
                "benchmark": "demo_startup",
                "cpus": os.cpu_count(),
                "nodewise_cold": cold,
                "nodewise_warm": warm,
                "nodewise_hot_redeploy": hot,
                "mlflow_models_serve": peer,
            }
        )
    )


if __name__ == "__main__":
    main()
