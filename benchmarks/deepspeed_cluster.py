"""The multi-node backend's figures: cold start, request latency at TP=1 and TP=2, memory per rank.

One run, on this machine, with a Llama-style causal LM registered in a fresh MLflow (the demo's:
hidden 256, 4 layers, 4 heads, random weights, transformers flavour):
- cold start to ready (launch -> every rank ready), TP=2, with an empty op cache (DeepSpeed
  builds its shared-memory all-reduce op) and again with the cache warm; TP=1 warm;
- request latency, sequential, ``POST /invocations`` with ``--seq`` token ids (forward pass) and
  ``POST /generate`` of 16 tokens, at TP=1 and TP=2;
- memory per rank (RSS from rank 0's /health) against the plan's per-rank estimate.
Peer, side by side: the same model under a hand-written DeepSpeed script (``_handwritten_deepspeed.py``,
launched with the environment set by hand: ``mpirun -x LOCAL_SIZE -x MASTER_ADDR -x MASTER_PORT``),
timing its own start-up and its forward passes in-process (no HTTP, no broadcast).

Usage: .venv/bin/python benchmarks/deepspeed_cluster.py [--requests 100] [--seq 32]   (last line: JSON)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(latencies: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(statistics.median(latencies), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "mean_ms": round(statistics.fmean(latencies), 2),
    }


def timed_launch(spec, settings, ranks: int) -> tuple[object, float, dict]:
    from tasks.mpi.health import wait_ready
    from tasks.mpi.launcher import launch

    start = time.monotonic()
    cluster = launch(spec.model_copy(update={"tp_size": ranks}), ["localhost"] * ranks, 1, settings)
    health = wait_ready(cluster, 900)
    return cluster, time.monotonic() - start, health


def latencies(endpoint: str, path: str, body: dict, n: int) -> dict[str, float]:
    """End-to-end latency summary, and the ranks' own compute time (the Server-Timing header)."""
    import httpx

    out, compute = [], []
    with httpx.Client(timeout=60) as client:
        client.post(f"{endpoint}{path}", json=body).raise_for_status()  # warm-up
        for _ in range(n):
            start = time.perf_counter()
            response = client.post(f"{endpoint}{path}", json=body)
            response.raise_for_status()
            out.append((time.perf_counter() - start) * 1000)
            compute.append(float(response.headers["server-timing"].split("dur=")[1]))
    return {**summary(out), "compute_p50_ms": round(statistics.median(compute), 2)}


def handwritten(model_dir: Path, ranks: int, seq: int, reps: int, op_cache: Path) -> dict:
    from nodewise.core.procs import free_port
    from serving._lm import local_shm_files

    port = free_port()
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(op_cache), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    env["LOCAL_SIZE"] = str(ranks)
    cmd = ["mpirun", "--allow-run-as-root", "-np", str(ranks), "--oversubscribe", "--bind-to", "none"]
    cmd += ["-x", "LOCAL_SIZE", "-x", "MASTER_ADDR", "-x", "MASTER_PORT", "-x", "TORCH_EXTENSIONS_DIR"]
    cmd += [sys.executable, str(ROOT / "benchmarks" / "_handwritten_deepspeed.py"), str(model_dir), str(seq), str(reps)]
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)
    wall = time.monotonic() - start
    for leftover in local_shm_files("127.0.0.1", port):  # DeepSpeed leaves them even on a clean exit
        os.unlink(leftover)
    if done.returncode != 0:
        raise SystemExit(f"the hand-written peer failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    result = json.loads([ln for ln in done.stdout.splitlines() if ln.startswith("{")][-1])
    return {
        "ready_s": round(result["ready_s"], 2),
        "wall_s": round(wall, 2),
        "forward": summary(result["latencies_ms"]),
        "generate16": summary(result["generate_ms"]),
    }


def bench_spec(resolved: object, settings: object, host: str) -> object:
    """The TP=2 spec of the registered bench LM (rank 0 on ``host``, port 8191)."""
    from serving.spec import DeepSpeedSpec

    return DeepSpeedSpec(
        app_name="bench",
        model_uri=resolved.pinned_uri,
        artifact_uri=resolved.artifact_uri,
        model_name=resolved.name,
        model_version=resolved.version,
        tracking_uri=settings.tracking_uri,
        registry_uri=settings.registry_uri,
        flavor="transformers",
        tp_size=2,
        host=host,
        port=8191,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--seq", type=int, default=32)
    args = parser.parse_args()

    state = Path(tempfile.mkdtemp(prefix="nw-bench-ds-", dir="/tmp"))
    from nodewise.core.runtime import configure_process
    from nodewise.core.settings import Settings

    settings = Settings(state_dir=state, deepspeed={"port": 8191})
    configure_process(settings)
    from mlflow import MlflowClient

    from nodewise.demo_models import build_llama, log_llama
    from tasks.mpi.launcher import stop_cluster
    from tasks.planning.profile_models import profile_registered
    from tasks.planning.registry import resolve_model

    model, tokenizer = build_llama()
    experiment = MlflowClient().create_experiment("bench", artifact_location=settings.state.artifacts.as_uri())
    version = log_llama(model, tokenizer, "bench-llama", experiment)
    resolved = resolve_model(f"models:/bench-llama/{version}", MlflowClient())
    profile = profile_registered(resolved, batch_size=1, device="cpu", measured=False)
    model_dir = state / "hf-model"
    model.save_pretrained(model_dir)  # type: ignore[attr-defined]
    spec = bench_spec(resolved, settings, host="127.0.0.1")
    ids = [[(i % 90) + 3 for i in range(args.seq)]]
    results: dict = {"model": "llama hidden=256 layers=4 heads=4 vocab=98, fp32, CPU", "seq": args.seq}
    try:
        cold: dict = {}
        for label, ranks in (("tp2_empty_op_cache", 2), ("tp2_warm_op_cache", 2), ("tp1_warm_op_cache", 1)):
            cluster, seconds, health = timed_launch(spec, settings, ranks)
            cold[label] = {
                "ready_s": round(seconds, 2),
                "phases_s": [r.get("phases", {}) for r in health["ranks"]],
            }
            if label != "tp2_empty_op_cache":
                tag = f"tp{ranks}"
                results[f"{tag}_forward"] = latencies(cluster.endpoint, "/invocations", {"inputs": ids}, args.requests)
                gen = {"input_ids": ids, "max_new_tokens": 16}
                results[f"{tag}_generate16"] = latencies(cluster.endpoint, "/generate", gen, 20)
                rss = [r["rss_bytes"] for r in health["ranks"]]
                results[f"{tag}_rss_mib_per_rank"] = [round(b / 2**20, 1) for b in rss]
                results[f"{tag}_plan_mib_per_rank"] = round(profile.per_rank_bytes(ranks) / 2**20, 1)
            stop_cluster(settings, "bench")
            print(json.dumps({label: cold[label]}), file=sys.stderr, flush=True)
        results["cold_start"] = cold
        for ranks in (1, 2):
            results[f"handwritten_tp{ranks}"] = handwritten(
                model_dir, ranks, args.seq, args.requests, settings.state.op_cache
            )
    finally:
        stop_cluster(settings, "bench")
        shutil.rmtree(state, ignore_errors=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
