"""LLM serving on the multi-node backend: continuous batching against serial, and against
Hugging Face's generate with a static batch.

One run on this machine. The demo's Llama-style LM (random weights; ``--hidden/--layers`` for a
bigger one) registered in a fresh MLflow, served by DeepSpeed at TP=2 under mpirun, twice:
batching on (the engine, ``serving/engine.py``) and off (``NODEWISE_DEEPSPEED__BATCHING=false``:
one request at a time, each a whole step, the backend before the engine). Closed-loop clients
at each concurrency (``--concurrency 1,4,16``) send ``POST /generate`` with token ids (prompts of
8-32 tokens, ``--new-tokens`` greedy tokens each) for ``--requests`` requests per client.
Tokens/s side by side: both modes answer ``POST /generate`` whole. Then batching again, streamed
through ``POST /v1/completions`` (the OpenAI route), for time to first token and between tokens
(serial mode cannot stream: its first token comes with its last). Then the same LM on Ray Serve,
one replica with the engine inside (``serving/llm_app.py``), streamed.
Measured: output tokens/s, requests/s, request latency p50/p99, time to first token and
inter-token latency p50/p99 (between streamed chunks), and each request's latency against the
same prompt's at concurrency 1 (the slowest ratio).
Peer in the same run: Hugging Face ``generate`` on the same weights in one process, the same
prompts in static batches of the concurrency's size (left-padded), its output tokens/s.
A larger model: ``--hidden 2048 --layers 8`` (about 1.3 GB in fp32) with fewer requests.

Usage: .venv/bin/python benchmarks/llm_serving.py [--concurrency 1,4,16] [--requests 6] [--no-serve]
(last line: one JSON object)
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.deepspeed_cluster import bench_spec, percentile  # noqa: E402


def make_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(8, 32))] for _ in range(n)]


def closed_loop(
    endpoint: str, prompts: list[list[int]], clients: int, new_tokens: int, stream: bool, model: str = "bench-llama"
) -> dict[str, Any]:
    """``clients`` threads, each sending its share of ``prompts`` one after another: streamed
    through ``POST /v1/completions`` (time to first token and between tokens measured), or whole
    through ``POST /generate`` (serial mode has no streaming: its first token comes with its last)."""
    import httpx

    latencies: dict[int, float] = {}
    first: list[float] = []
    gaps: list[float] = []
    tokens = [0]
    errors: list[str] = []
    lock = threading.Lock()

    def streamed(http: Any, i: int) -> tuple[float, list[float], int]:
        body = {"model": model, "prompt": prompts[i], "max_tokens": new_tokens, "stream": True}
        body["stream_options"] = {"include_usage": True}
        start = time.perf_counter()
        marks, count = [], 0
        with http.stream("POST", f"{endpoint}/v1/completions", json=body) as answer:
            if answer.status_code != 200:
                raise RuntimeError(f"{answer.status_code}: {answer.read()[:200]!r}")
            for line in answer.iter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    count = event["usage"]["completion_tokens"]
                elif event["choices"] and event["choices"][0]["text"]:
                    marks.append(time.perf_counter() - start)
        return marks[0] if marks else time.perf_counter() - start, marks, count

    def client(k: int) -> None:
        with httpx.Client(timeout=600) as http:
            for i in range(k, len(prompts), clients):
                start = time.perf_counter()
                try:
                    if stream:
                        ttft, marks, count = streamed(http, i)
                    else:
                        answer = http.post(
                            f"{endpoint}/generate", json={"input_ids": [prompts[i]], "max_new_tokens": new_tokens}
                        )
                        if answer.status_code != 200:
                            raise RuntimeError(f"{answer.status_code}: {answer.text[:200]}")
                        count, marks = len(answer.json()["output_ids"][0]), []
                        ttft = time.perf_counter() - start
                except (RuntimeError, httpx.HTTPError) as e:
                    with lock:
                        errors.append(str(e))
                    continue
                took = time.perf_counter() - start
                with lock:
                    latencies[i] = took
                    tokens[0] += count
                    first.append(ttft)
                    gaps.extend(b - a for a, b in itertools.pairwise(marks))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    values = list(latencies.values())

    def ms(values: list[float], q: float) -> float | None:
        return round(percentile(values, q) * 1000, 1) if values else None

    return {
        "clients": clients,
        "requests": len(values),
        "errors": errors[:3],
        "output_tokens_per_s": round(tokens[0] / wall, 1),
        "requests_per_s": round(len(values) / wall, 2),
        "latency_p50_ms": ms(values, 50),
        "latency_p99_ms": ms(values, 99),
        "ttft_p50_ms": ms(first, 50),
        "ttft_p99_ms": ms(first, 99),
        "itl_p50_ms": ms(gaps, 50),
        "itl_p99_ms": ms(gaps, 99),
        "_by_prompt": latencies,
    }


def serve_replica(resolved: Any, settings: Any) -> str:
    """The same LM on Ray Serve (nodewise's local Ray, HAProxy ingress): one replica with the engine
    inside (serving/llm_app.py), two torch threads."""
    from serving.spec import ModelServeSpec
    from tasks.rayserve.apps import deploy_app
    from tasks.rayserve.cluster import ensure_cluster

    ensure_cluster(settings)
    spec = ModelServeSpec(
        app_name="bench-llama",
        route_prefix="/bench-llama",
        model_uri=resolved.pinned_uri,
        model_name=resolved.name,
        model_version=resolved.version,
        tracking_uri=settings.tracking_uri,
        registry_uri=settings.registry_uri,
        flavor="python_function",
        num_cpus=1,
        torch_threads=2,
        engine=True,
        max_ongoing_requests=64,
    )
    return deploy_app(spec, settings, remote_cluster=False)


def hf_static(model_dir: Path, prompts: list[list[int]], batch: int, new_tokens: int) -> dict[str, Any]:
    """The peer: Hugging Face's generate in this process, static batches of ``batch`` prompts."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    produced = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), batch):
            group = prompts[i : i + batch]
            width = max(len(p) for p in group)
            ids = torch.tensor([[2] * (width - len(p)) + p for p in group])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=2)
            produced += (out.shape[1] - width) * len(group)
    wall = time.perf_counter() - start
    return {"batch": batch, "output_tokens_per_s": round(produced / wall, 1)}


def metrics_cost(resolved: Any, settings: Any, run_levels: Any, levels: list[int]) -> dict[str, Any]:
    """Rank 0 (batching, TP=2) with its metrics on and off, after a warm-up, in ABBA order: whole answers
    and streamed ones; the ratio of the medians of each pair's tokens/s and streamed TTFT p99."""
    from tasks.mpi.health import wait_ready
    from tasks.mpi.launcher import launch, stop_cluster

    runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": [], "warm-up": []}
    # a first launch not counted (the first one runs cold: file cache, allocator), then on/off in ABBA order
    for metrics, key in ((True, "warm-up"), (True, "on"), (False, "off"), (False, "off"), (True, "on")):
        spec = bench_spec(resolved, settings, host="127.0.0.1").model_copy(update={"metrics": metrics})
        cluster = launch(spec, ["localhost", "localhost"], 1, settings)
        wait_ready(cluster, 900)
        runs[key].append(
            {
                "whole": run_levels(f"metrics_{key}", cluster.endpoint, False),
                "streamed": run_levels(f"metrics_{key}_streamed", cluster.endpoint, True),
            }
        )
        stop_cluster(settings, "bench")
    top = max(levels)

    def median(key: str, kind: str, field: str) -> float:
        values = sorted(next(r[field] for r in run[kind] if r["clients"] == top) for run in runs[key])
        return (values[0] + values[-1]) / 2

    return {
        "metrics_runs": runs,
        f"metrics_on_vs_off_tokens_per_s_x_c{top}": round(
            median("on", "whole", "output_tokens_per_s") / median("off", "whole", "output_tokens_per_s"), 3
        ),
        f"metrics_on_vs_off_streamed_tokens_per_s_x_c{top}": round(
            median("on", "streamed", "output_tokens_per_s") / median("off", "streamed", "output_tokens_per_s"), 3
        ),
        f"metrics_on_vs_off_ttft_p99_x_c{top}": round(
            median("on", "streamed", "ttft_p99_ms") / median("off", "streamed", "ttft_p99_ms"), 3
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests", type=int, default=6, help="requests per client")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--no-serve", action="store_true", help="skip the Ray Serve replica")
    parser.add_argument(
        "--metrics-cost",
        action="store_true",
        help="only rank 0 with metrics on and off, twice each after a warm-up (the issue 31 figure: on >= 0.97x off)",
    )
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    state = Path(tempfile.mkdtemp(prefix="nw-bench-llm-", dir="/tmp"))
    from nodewise.core.runtime import configure_process
    from nodewise.core.settings import Settings

    op_cache = ROOT / ".nodewise" / "bench-op-cache"  # DeepSpeed's op, built once across runs
    settings = Settings(state_dir=state, deepspeed={"port": 8191, "op_cache_dir": str(op_cache)})
    configure_process(settings)
    from mlflow import MlflowClient

    from nodewise.demo_models import build_llama, log_llama
    from tasks.mpi.health import wait_ready
    from tasks.mpi.launcher import launch, stop_cluster
    from tasks.planning.registry import resolve_model

    model, tokenizer = build_llama(hidden=args.hidden, layers=args.layers, heads=max(4, args.hidden // 64))
    params = sum(p.numel() for p in model.parameters())
    experiment = MlflowClient().create_experiment("bench", artifact_location=settings.state.artifacts.as_uri())
    version = log_llama(model, tokenizer, "bench-llama", experiment)
    resolved = resolve_model(f"models:/bench-llama/{version}", MlflowClient())
    model_dir = state / "hf-model"
    model.save_pretrained(model_dir)
    vocab = model.config.vocab_size
    result: dict[str, Any] = {
        "model": f"llama hidden={args.hidden} layers={args.layers} params={params / 1e6:.1f}M fp32, CPU",
        "new_tokens": args.new_tokens,
        "tp": 2,
    }

    def run_levels(mode: str, endpoint: str, stream: bool) -> list[dict[str, Any]]:
        alone: dict[int, float] = {}
        rows = []
        for clients in levels:
            prompts = make_prompts(clients * args.requests, vocab)
            row = closed_loop(endpoint, prompts, clients, args.new_tokens, stream)
            by_prompt = row.pop("_by_prompt")
            if clients == min(levels):
                alone = by_prompt
            elif alone:
                # the same prompt list prefix at the lowest concurrency: compare request by request
                common = [i for i in by_prompt if i in alone]
                if common:
                    row["slowest_vs_alone"] = round(max(by_prompt[i] / alone[i] for i in common), 2)
            rows.append(row)
            print(json.dumps({mode: row}), file=sys.stderr, flush=True)
        return rows

    if args.metrics_cost:
        try:
            result.update(metrics_cost(resolved, settings, run_levels, levels))
        finally:
            from nodewise.ops.status import stop_everything

            stop_cluster(settings, "bench")
            stop_everything(settings)
            shutil.rmtree(state, ignore_errors=True)
        print(json.dumps(result))
        return
    try:
        for mode, batching in (("batching", True), ("serial", False)):
            spec = bench_spec(resolved, settings, host="127.0.0.1").model_copy(update={"batching": batching})
            cluster = launch(spec, ["localhost", "localhost"], 1, settings)
            wait_ready(cluster, 900)
            # the same route for both modes (whole answers from /generate): tokens/s side by side
            result[mode] = run_levels(mode, cluster.endpoint, stream=False)
            if batching:  # and streamed through /v1/completions: time to first token, between tokens
                result["batching_streamed"] = run_levels("batching_streamed", cluster.endpoint, stream=True)
            stop_cluster(settings, "bench")
        if not args.no_serve:
            endpoint = serve_replica(resolved, settings)
            result["ray_serve_1_replica_streamed"] = run_levels("ray_serve", endpoint, stream=True)
        result["hf_generate_static_batch"] = [
            hf_static(model_dir, make_prompts(c * args.requests, vocab), c, args.new_tokens) for c in levels
        ]
        by = {r["clients"]: r for r in result["batching"]}
        serial = {r["clients"]: r for r in result["serial"]}
        top, low = max(levels), min(levels)
        result["speedup_vs_serial_at_max_concurrency"] = round(
            by[top]["output_tokens_per_s"] / serial[top]["output_tokens_per_s"], 2
        )
        streamed = {r["clients"]: r for r in result["batching_streamed"]}
        result["ttft_p99_ratio_max_vs_min_concurrency"] = round(
            streamed[top]["ttft_p99_ms"] / streamed[low]["ttft_p99_ms"], 2
        )
        result["targets"] = {
            "tokens_per_s_5x_serial_at_16": result["speedup_vs_serial_at_max_concurrency"] >= 5,
            "ttft_p99_at_16_within_3x_of_c1": result["ttft_p99_ratio_max_vs_min_concurrency"] <= 3,
            "no_request_over_2x_alone_at_4": by.get(4, {}).get("slowest_vs_alone", 0) <= 2,
        }
    finally:
        from nodewise.ops.status import stop_everything

        stop_cluster(settings, "bench")
        stop_everything(settings)
        shutil.rmtree(state, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
