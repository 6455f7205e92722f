"""Failed requests and latency while nodewise upgrades a served model to a new version under load.

The reference MLP of serve_throughput.py, two registered versions. `nodewise deploy` of v1, then
wrk (closed loop, C connections) against the endpoint for the whole window, and `nodewise deploy`
of v2 in the middle of it: a rolling update of the Serve app in place. Reported: requests failed
(non-2xx and socket errors) during the window, requests/s, p50/p99 over the window, the same
figures for a steady window of the same length without an upgrade (the baseline), and how long
the upgrade took (the CLI's deploy, profiling of the new version included).

Usage: .venv/bin/python benchmarks/upgrade_under_load.py [--connections 8] [--seconds 90]
(last line: one JSON object)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._load import parse_wrk, require_wrk, run_wrk, start_wrk, wait_ready  # noqa: E402
from benchmarks.serve_throughput import BIN, MODEL, register, request_body  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=90)
    args = parser.parse_args()
    require_wrk()
    workdir = Path(tempfile.mkdtemp(prefix="nw-upg-"))
    db = f"sqlite:///{workdir / 'mlflow.db'}"
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": db,
        "NODEWISE_MLFLOW__TRACKING_URI": db,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "NODEWISE_STATE_DIR": str(workdir / "state"),
        "NODEWISE_SERVE__PORT": "18710",
    }
    os.environ.update({"MLFLOW_TRACKING_URI": db, "MLFLOW_DISABLE_TELEMETRY": "true"})
    v1, v2 = register(workdir, seed=0), register(workdir, seed=1)
    url = f"http://127.0.0.1:18710/{MODEL}/invocations"
    body = request_body()
    log = (workdir / "nodewise.log").open("w")
    failed = True
    try:
        subprocess.run([str(BIN / "nodewise"), "deploy", v1], env=env, stdout=log, stderr=log, check=True)
        wait_ready(url, body)
        run_wrk(url, body, args.connections, 3)  # warm-up
        steady = run_wrk(url, body, args.connections, args.seconds)
        print(f"steady: {steady}", file=sys.stderr, flush=True)
        with start_wrk(url, body, args.connections, args.seconds) as wrk:
            time.sleep(5)
            start = time.monotonic()
            subprocess.run([str(BIN / "nodewise"), "deploy", v2], env=env, stdout=log, stderr=log, check=True)
            upgrade_s = time.monotonic() - start
            out, _ = wrk.communicate()
        during = parse_wrk(out)
        print(f"during upgrade: {during}", file=sys.stderr, flush=True)
        import httpx

        version = httpx.get(url.replace("/invocations", "/version"), timeout=10).json()["version"]
        failed = False
    finally:
        subprocess.run([str(BIN / "nodewise"), "down"], env=env, stdout=log, stderr=log, check=False)
        log.close()
        if failed:
            print(f"logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(
        json.dumps(
            {
                "benchmark": "upgrade_under_load",
                "connections": args.connections,
                "window_s": args.seconds,
                "upgrade_s": round(upgrade_s, 1),
                "served_version_after": version,
                "expected_version_after": v2.rsplit("/", 1)[1],
                "steady": steady,
                "during_upgrade": during,
                "failed_during_upgrade": during["failed"],
            }
        )
    )


if __name__ == "__main__":
    main()
