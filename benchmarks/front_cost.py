"""What the DeepSpeed front (serving/front.py, issue 32) costs when nothing fails: the same group
called directly at rank 0 and through its front, side by side in one run.

One group of two local ranks (the demo's LM: hidden 256, 4 layers, TP=2) and one front process
(``python -m serving.front``) proxying to it, on this machine. Rounds alternate the two paths
(rank 0, then the front, then rank 0 ...), each round:
- ``POST /invocations`` (``--seq`` token ids) one at a time: p50 and p99 end to end;
- ``POST /invocations`` with wrk at ``--connections`` (closed loop, ``--seconds`` s): req/s, p99;
- for the front, the CPU time its process used per request over the round (user + system): what
  it takes from the cores the ranks compute on, and a figure the machine's noise moves far less
  than the latencies.
Targets (issue 32): the front adds <= 1 ms at p50 and keeps >= 0.95x req/s.

Usage: .venv/bin/python benchmarks/front_cost.py [--rounds 3] [--requests 200] [--seq 32]
[--connections 16] [--seconds 10]  (needs wrk; last line: one JSON object)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._load import require_wrk, run_wrk  # noqa: E402
from benchmarks.deepspeed_cluster import bench_spec, latencies, timed_launch  # noqa: E402


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far."""
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def start_front(upstream: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    """The front as ``tasks/mpi/front.py`` starts it, without a record to follow (rank 0 stays put)."""
    import httpx

    command = [sys.executable, "-m", "serving.front", "--upstream", upstream, "--host", "127.0.0.1"]
    command += ["--port", str(port), "--app", "bench"]
    with open(log, "ab") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the front exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/front", timeout=2).json().get("ready"):
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"the front did not say ready within 60 s: {log.read_text()[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    require_wrk()

    state = Path(tempfile.mkdtemp(prefix="nw-bench-front-", dir="/tmp"))
    from nodewise.core.procs import free_port
    from nodewise.core.runtime import configure_process
    from nodewise.core.settings import Settings

    settings = Settings(state_dir=state, deepspeed={"port": free_port()})
    configure_process(settings)
    from mlflow import MlflowClient

    from nodewise.demo_models import build_llama, log_llama
    from tasks.mpi.launcher import stop_cluster
    from tasks.planning.registry import resolve_model

    model, tokenizer = build_llama()
    experiment = MlflowClient().create_experiment("bench", artifact_location=settings.state.artifacts.as_uri())
    version = log_llama(model, tokenizer, "bench-llama", experiment)
    resolved = resolve_model(f"models:/bench-llama/{version}", MlflowClient())
    spec = bench_spec(resolved, settings, host="127.0.0.1")
    body = {"inputs": [[(i % 90) + 3 for i in range(args.seq)]]}
    front_port = free_port()
    runs: dict[str, list[dict]] = {"rank0": [], "front": []}
    front = None
    try:
        cluster, _, _ = timed_launch(spec, settings, 2)
        front = start_front(cluster.endpoint, front_port, state / "front.log")
        paths = {"rank0": cluster.endpoint, "front": f"http://127.0.0.1:{front_port}"}
        for round_ in range(args.rounds):
            for label, endpoint in paths.items():
                cpu_before = cpu_s(front.pid)
                one = latencies(endpoint, "/invocations", body, args.requests)
                loaded = run_wrk(f"{endpoint}/invocations", json.dumps(body).encode(), args.connections, args.seconds)
                run = {"c1": one, f"c{args.connections}": loaded}
                if label == "front":
                    served = args.requests + int(loaded["requests"])
                    run["front_cpu_ms_per_request"] = round((cpu_s(front.pid) - cpu_before) * 1000 / served, 3)
                runs[label].append(run)
                print(json.dumps({"round": round_, label: run}), file=sys.stderr, flush=True)
    finally:
        if front is not None:
            front.terminate()
            front.wait(10)
        stop_cluster(settings, "bench")
        shutil.rmtree(state, ignore_errors=True)

    def median(label: str, level: str, key: str) -> float:
        return statistics.median(float(r[level][key]) for r in runs[label])

    c = f"c{args.connections}"
    p50 = {label: median(label, "c1", "p50_ms") for label in runs}
    rps = {label: median(label, c, "rps") for label in runs}
    added_ms = round(p50["front"] - p50["rank0"], 2)
    cpu_ms = statistics.median(r["front_cpu_ms_per_request"] for r in runs["front"])
    ratio = round(rps["front"] / rps["rank0"], 3)
    print(
        json.dumps(
            {
                "benchmark": "front_cost",
                "model": "llama hidden=256 layers=4 heads=4 vocab=98, fp32, CPU, TP=2 (2 local ranks)",
                "seq": args.seq,
                "rounds": args.rounds,
                "runs": runs,
                "c1_p50_ms": p50,
                f"{c}_requests_per_s": rps,
                "front_added_p50_ms": added_ms,
                f"front_{c}_req_per_s_ratio": ratio,
                "front_cpu_ms_per_request": cpu_ms,
                "targets": {"added_p50_at_most_1_ms": added_ms <= 1.0, "req_per_s_at_least_0.95x": ratio >= 0.95},
            }
        )
    )


if __name__ == "__main__":
    main()
