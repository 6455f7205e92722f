"""Requests/s, p50 and p99 of one registered model behind nodewise and behind the peers a user
would otherwise run, side by side in one run, with the same closed-loop load generator (wrk).

Model: an MLP 784-2048-2048-2048-10 (10M parameters, fp32), logged in the pickle format so it
takes any batch size; requests: one row as MLflow `{"inputs": [[...784 floats]]}` JSON (~16 KB).
Servers, one at a time on this machine's loopback:
  mlflow-1          `mlflow models serve` (its default single worker)
  mlflow-2          `mlflow models serve --workers 2`
  ray-handwritten   a minimal hand-written Ray Serve app with @serve.batch (benchmarks/_handwritten_serve.py)
  nodewise          `nodewise deploy` with its defaults
  nodewise-*        nodewise with one lever turned back to Ray Serve's default (--levers), to show
                    what each lever gives
Each point: wrk -c C for --seconds, after a warm-up; C in 1, 8, 32. With --fixed 1,2,3,4 also
nodewise at each fixed replica count, and the default against the best of them at every point;
each point records the replica processes alive and the CPU seconds per kind of process
(benchmarks/_procs.py). --settle S: S seconds of each point's load before it is measured.

Usage: .venv/bin/python benchmarks/serve_throughput.py [--seconds 15] [--levers] [--fixed 1,2,3,4]
       [--settle S] [--only NAME,...]
(last line: one JSON object)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
MODEL = "mlp-10m"

from benchmarks._load import require_wrk, run_wrk, wait_ready  # noqa: E402
from benchmarks._models import reference_mlp  # noqa: E402
from benchmarks._procs import ProcSampler  # noqa: E402

# Lever -> the nodewise setting that turns it off (back to Ray Serve's default, or to the usual
# @serve.batch wait of a hand-written app).
LEVERS = {
    "no-haproxy-ingress": {"NODEWISE_SERVE__INGRESS": "proxy"},
    "no-throughput-mode": {"NODEWISE_SERVE__THROUGHPUT_OPTIMIZED": "false"},
    "no-batching": {"NODEWISE_SERVE__MAX_BATCH_SIZE": "1"},
    "batch-wait-5ms": {"NODEWISE_SERVE__BATCH_WAIT_TIMEOUT_S": "0.005"},
    "max-ongoing-5": {"NODEWISE_SERVE__MAX_ONGOING_REQUESTS": "5"},
    "no-metrics": {"NODEWISE_METRICS__ENABLED": "false"},  # what the metrics cost (issue 31: on >= 0.97x off)
}


def register(workdir: Path, seed: int = 0) -> str:
    """Register the reference MLP (a new version each call); returns models:/NAME/VERSION."""
    import mlflow
    import torch

    torch.manual_seed(seed)
    mlp = reference_mlp().eval()
    found = mlflow.get_experiment_by_name("throughput")
    exp = (
        found.experiment_id
        if found
        else mlflow.create_experiment("throughput", artifact_location=f"file://{workdir / 'artifacts'}")
    )
    with mlflow.start_run(experiment_id=exp):
        info = mlflow.pytorch.log_model(
            mlp,
            name="model",
            input_example=np.random.rand(1, 784).astype("float32"),
            serialization_format="pickle",
            registered_model_name=MODEL,
            pip_requirements=["torch"],
        )
    return f"models:/{MODEL}/{info.registered_model_version}"


def request_body() -> bytes:
    row = np.random.default_rng(0).random(784).astype("float32")
    return json.dumps({"inputs": [row.tolist()]}).encode()


def _stop(proc: subprocess.Popen, timeout_s: float = 30) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def mlflow_serve(env: dict[str, str], uri: str, port: int, workers: int, log: Path) -> Iterator[str]:
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local"]
    cmd += ["-h", "127.0.0.1", "-p", str(port), "--workers", str(workers)]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield f"http://127.0.0.1:{port}/invocations"
    finally:
        _stop(proc)


@contextlib.contextmanager
def handwritten(env: dict[str, str], uri: str, port: int, workdir: Path, log: Path) -> Iterator[str]:
    temp = Path(tempfile.mkdtemp(prefix="nw-hw-", dir="/tmp"))  # Ray's socket paths must stay short
    cmd = [sys.executable, str(ROOT / "benchmarks/_handwritten_serve.py"), uri, str(port), str(temp)]
    token = workdir / "hw_token"  # Ray 2.60 turns on token auth; keep its token out of ~/.ray
    token.write_text(secrets.token_hex(32))
    hw_env = {**env, "RAY_AUTH_TOKEN_PATH": str(token)}
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=hw_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        _stop(proc, 60)
        subprocess.run(["rm", "-rf", str(temp)], check=False)


@contextlib.contextmanager
def nodewise(env: dict[str, str], uri: str, port: int, state: Path, log: Path) -> Iterator[str]:
    nw_env = {**env, "NODEWISE_STATE_DIR": str(state), "NODEWISE_SERVE__PORT": str(port)}
    try:
        with log.open("w") as out:
            subprocess.run(
                [str(BIN / "nodewise"), "deploy", uri], env=nw_env, stdout=out, stderr=subprocess.STDOUT, check=True
            )
        yield f"http://127.0.0.1:{port}/{MODEL}/invocations"
    finally:
        with log.open("a") as out:
            subprocess.run([str(BIN / "nodewise"), "down"], env=nw_env, stdout=out, stderr=subprocess.STDOUT)


def measure(url: str, body: bytes, seconds: int, concurrencies: list[int], settle: int = 0) -> dict[str, dict]:
    wait_ready(url, body)
    run_wrk(url, body, 8, 3)  # warm-up: lazy imports, allocator, connection pools
    points = {}
    for c in concurrencies:
        if settle:  # the same load, not measured: an autoscaled deployment reaches its count for it
            run_wrk(url, body, c, settle)
        with ProcSampler() as procs:  # replicas alive and CPU per kind of process, during the point
            points[f"c{c}"] = run_wrk(url, body, c, seconds)
        points[f"c{c}"]["procs"] = procs.summary()
        print(f"  c={c}: {points[f'c{c}']}", file=sys.stderr, flush=True)
    return points


def vs_best_fixed(default: dict, fixed: dict[str, dict], concurrencies: list[int]) -> dict:
    """Per concurrency: the fixed count with the most req/s, and the default's req/s and p99 over its
    (issue 33's targets: >= 0.9x the req/s, <= 1.5x the p99)."""
    out = {}
    for c in concurrencies:
        key = f"c{c}"
        best = max(fixed, key=lambda k: fixed[k][key]["rps"])
        rps_x = round(default[key]["rps"] / fixed[best][key]["rps"], 3)
        p99_x = round(default[key]["p99_ms"] / max(fixed[best][key]["p99_ms"], 0.1), 3)
        out[key] = {"best": best, "rps_x": rps_x, "p99_x": p99_x, "met": rps_x >= 0.9 and p99_x <= 1.5}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument(
        "--settle",
        type=int,
        default=0,
        help="seconds of each point's load before it is measured (0: measured from its first request, "
        "so an autoscaled deployment's scale-up counts in the point)",
    )
    parser.add_argument("--levers", action="store_true", help="also run nodewise with each lever turned off")
    parser.add_argument("--only", default="", help="comma-separated server names")
    parser.add_argument(
        "--fixed",
        default="",
        help="also run nodewise at these fixed replica counts (e.g. 1,2,3,4: servers nodewise-fixed-N), "
        "and compare the default with the best of them at every concurrency",
    )
    args = parser.parse_args()
    require_wrk()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="nw-tput-"))
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
        "NODEWISE_MLFLOW__TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    os.environ.update({k: env[k] for k in ("MLFLOW_TRACKING_URI", "MLFLOW_DISABLE_TELEMETRY")})
    uri = register(workdir)
    body = request_body()
    port = 18700
    servers = {
        "mlflow-1": lambda log: mlflow_serve(env, uri, port, 1, log),
        "mlflow-2": lambda log: mlflow_serve(env, uri, port, 2, log),
        "ray-handwritten": lambda log: handwritten(env, uri, port, workdir, log),
        "nodewise": lambda log: nodewise(env, uri, port, workdir / "nw", log),
    }
    if args.levers:
        for lever, overrides in LEVERS.items():
            servers[f"nodewise-{lever}"] = lambda log, o=overrides, n=lever: nodewise(
                {**env, **o}, uri, port, workdir / f"nw-{n}", log
            )
    for n in (int(n) for n in args.fixed.split(",") if n):
        servers[f"nodewise-fixed-{n}"] = lambda log, n=n: nodewise(
            {**env, "NODEWISE_SERVE__REPLICAS": str(n)}, uri, port, workdir / f"nw-fixed-{n}", log
        )
    wanted = [s for s in args.only.split(",") if s] or list(servers)
    results = {}
    for name in wanted:
        print(f"{name}:", file=sys.stderr, flush=True)
        log = workdir / f"{name}.log"
        try:
            with servers[name](log) as url:
                results[name] = measure(url, body, args.seconds, concurrencies, args.settle)
        except Exception as e:  # keep the other servers' numbers; say what failed
            results[name] = {"error": f"{type(e).__name__}: {e}"[:300], "log": str(log)}
            print(f"  failed: {e}; log: {log}", file=sys.stderr)
    if not any("error" in r for r in results.values()):
        shutil.rmtree(workdir, ignore_errors=True)  # keep the logs only when something failed
    summary = {
        "benchmark": "serve_throughput",
        "seconds_per_point": args.seconds,
        "settle_s": args.settle,
        "servers": results,
    }
    nw, ml1, ml2, hw = (results.get(k, {}) for k in ("nodewise", "mlflow-1", "mlflow-2", "ray-handwritten"))
    top = f"c{max(concurrencies)}"
    if all(top in r for r in (nw, ml1, ml2, hw)):
        summary["nodewise_vs_mlflow1_rps_x"] = round(nw[top]["rps"] / ml1[top]["rps"], 2)
        summary["nodewise_vs_mlflow2_rps_x"] = round(nw[top]["rps"] / ml2[top]["rps"], 2)
        summary["nodewise_p99_le_mlflow1"] = nw[top]["p99_ms"] <= ml1[top]["p99_ms"]
        summary["nodewise_ge_handwritten_every_c"] = all(
            nw[f"c{c}"]["rps"] >= hw[f"c{c}"]["rps"] for c in concurrencies
        )
    fixed = {k: r for k, r in results.items() if k.startswith("nodewise-fixed-") and "error" not in r}
    if fixed and all(f"c{c}" in nw for c in concurrencies):
        summary["default_vs_best_fixed"] = vs_best_fixed(nw, fixed, concurrencies)
    off = results.get("nodewise-no-metrics", {})
    if all(f"c{c}" in nw and f"c{c}" in off for c in concurrencies):
        summary["metrics_on_vs_off_rps_x"] = {
            f"c{c}": round(nw[f"c{c}"]["rps"] / off[f"c{c}"]["rps"], 3) for c in concurrencies
        }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
