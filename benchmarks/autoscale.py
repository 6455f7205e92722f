"""Replicas following traffic: a load step against the demo model, autoscaling against a fixed replica.

One run on this machine, one local nodewise instance, the demo digits MLP registered twice:
- ``autoscaled``: Serve's autoscaler between ``--min`` and ``--max`` replicas, with nodewise's
  settings (``target_ongoing_requests``, ``upscale_delay_s``, ``downscale_delay_s``; flags below);
- ``fixed`` (the peer, same run, same load): ``--min`` replicas and no autoscaling.
Each gets the same profile: idle ``--idle`` s, then ``--clients`` closed-loop clients for
``--hold`` s, then nothing until its replicas are back at ``--min`` (or ``--settle`` s passed).
A sampler reads Serve's replica states every 0.5 s. Per 5 s window: requests/s, p99, failures,
replicas running. Figures: seconds from the step to the first added replica RUNNING (Serve
routes to it from then on), seconds from the end of the load back to ``--min``, requests/s
in the last ``--tail`` s of the hold against the fixed peer's, failed requests.
A PNG (replicas and req/s over time, both runs) is written beside ``--out``.
With ``--added-nodes N`` the local instance's head offers ``--head-cpus`` and Ray's autoscaler
may add N nodes (ray.max_added_nodes): the Ray nodes alive are sampled and plotted too.
Last, a model that scales to zero (min_replicas 0): seconds from its last request to no replica,
and from a request to its answer (the cold start).
The start of a new replica, named in parts: a fresh Python process's imports and the model load
from MLflow are timed alone (``start_parts``), the rest of step -> RUNNING is the decision and
Serve's start and health check (an autoscaled replica runs no smoke test: the deploy ran it).
With ``--llm``: the demo's tiny Llama instead, autoscaled by default, under closed-loop clients
sending ``/v1/completions`` at ``--llm-steps`` (e.g. 1,16,48; ``--llm-hold`` s each): replicas over
time and the engine's sequences waiting with no room and running (its ``/health``, every 0.5 s). The rule
(serving/autoscaling.py): a replica is added only while sequences wait.

Usage: .venv/bin/python benchmarks/autoscale.py [--clients 16] [--max N] [--out autoscale.json]
       [--added-nodes 1 --head-cpus 1] [--llm --llm-steps 1,16,48]
(last line: one JSON object)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from testkit import LoadClient, serve_replicas  # noqa: E402


class Sampler:
    """Serve's RUNNING replicas of ``app`` every 0.5 s (and any other state they are in)."""

    def __init__(self, app: str) -> None:
        self.app, self.samples = app, []  # (time, running, all replicas)
        self.nodes: list[tuple[float, int]] = []  # (time, Ray nodes alive)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import ray

        while not self._stop.is_set():
            states = [r["state"] for r in serve_replicas(self.app)]
            self.samples.append((time.time(), states.count("RUNNING"), len(states)))
            self.nodes.append((time.time(), sum(n["Alive"] for n in ray.nodes())))
            time.sleep(0.5)

    def running_now(self) -> int:
        return self.samples[-1][1] if self.samples else 0

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def profile(record: Any, body: bytes, args: argparse.Namespace, floor: int) -> dict[str, Any]:
    """The load profile against one deployment; its figures and its time series."""
    clients = LoadClient(f"{record.endpoint}/invocations", body, args.clients)
    sampler = Sampler(record.app_name)
    t0 = time.time()
    time.sleep(args.idle)
    step = time.time()
    clients.start()
    time.sleep(args.hold)
    clients.stop()
    load_end = time.time()
    log = [(o.at, o.outcome, o.latency_s) for o in clients.log]
    deadline = time.monotonic() + args.settle
    while time.monotonic() < deadline:
        settled = all(r == floor for _, r, n in sampler.samples[-4:]) and sampler.samples[-1][2] == floor
        if settled and (not sampler.nodes or sampler.nodes[-1][1] <= sampler.nodes[0][1]):  # added nodes gone too
            break
        time.sleep(0.5)
    sampler.stop()
    up = next((t - step for t, r, _ in sampler.samples if t >= step and r > floor), None)
    decided = next((t - step for t, _, n in sampler.samples if t >= step and n > floor), None)
    peak = max((r for t, r, _ in sampler.samples if step <= t <= load_end), default=0)
    above = [t for t, r, _ in sampler.samples if t >= load_end and r > floor]
    down = (max(above) - load_end + 0.5) if above else 0.0
    tail = [(t, o, s) for t, o, s in log if load_end - args.tail <= t <= load_end]
    windows = series(log, sampler.samples, t0, sampler.nodes)
    nodes_up = next((t - step for t, n in sampler.nodes if t >= step and n > sampler.nodes[0][1]), None)
    return {
        "nodes_at_start": sampler.nodes[0][1] if sampler.nodes else None,
        "peak_nodes": max((n for t, n in sampler.nodes if step <= t <= load_end), default=None),
        "step_to_node_added_s": None if nodes_up is None else round(nodes_up, 1),
        "nodes_at_end": sampler.nodes[-1][1] if sampler.nodes else None,
        "load_end_to_nodes_removed_s": nodes_down(sampler.nodes, load_end),
        "step_to_scale_up_decided_s": None if decided is None else round(decided, 1),  # a replica STARTING
        "step_to_new_replica_running_s": None if up is None else round(up, 1),
        "peak_replicas": peak,
        "load_end_to_min_replicas_s": round(down, 1) if peak > floor else None,
        "requests": len(log),
        "failed": sum(o != "200" for _, o, _ in log),
        "failed_outcomes": sorted({o for _, o, _ in log if o != "200"}),
        "tail_req_per_s": round(len(tail) / args.tail, 1),
        "tail_p99_ms": round(percentile([s for _, _, s in tail], 99) * 1000, 1),
        "windows": windows,
    }


def nodes_down(nodes: list[tuple[float, int]], load_end: float) -> float | None:
    """Seconds from the end of the load to the last sample with more nodes than at the start."""
    if not nodes or max(n for _, n in nodes) <= nodes[0][1]:
        return None
    above = [t for t, n in nodes if t >= load_end and n > nodes[0][1]]
    return round(max(above) - load_end + 0.5, 1) if above else 0.0


def cold_start(record: Any, body: bytes) -> dict[str, Any]:
    """A model that scales to zero: seconds from its last request to no replica, then from one
    request to its answer (a replica started for it)."""
    import httpx

    def replicas() -> int:
        return len(serve_replicas(record.app_name))

    last = time.monotonic()
    httpx.post(f"{record.endpoint}/invocations", content=body, timeout=60).raise_for_status()
    while replicas() > 0:
        if time.monotonic() - last > 180:
            return {"error": "still had replicas 180 s after its last request"}
        time.sleep(0.25)
    idle_s = time.monotonic() - last
    began = time.monotonic()
    answer = httpx.post(f"{record.endpoint}/invocations", content=body, timeout=120)
    return {
        "downscale_delay_s": record.spec["downscale_delay_s"],
        "last_request_to_zero_replicas_s": round(idle_s, 1),
        "cold_request_status": answer.status_code,
        "cold_start_to_first_answer_s": round(time.monotonic() - began, 2),
    }


def start_parts(model_uri: str, settings: Any) -> dict[str, float]:
    """A new replica's own work, timed alone in a fresh process: its imports, then the model load
    from MLflow (what ModelServer.__init__ does before Serve marks the replica RUNNING)."""
    import subprocess

    code = (
        "import json, sys, time; t0 = time.perf_counter()\n"
        "from serving._model import LoadedModel; from serving.spec import ModelServeSpec\n"
        "t1 = time.perf_counter(); spec = ModelServeSpec.model_validate_json(sys.argv[1])\n"
        "LoadedModel.load(spec); t2 = time.perf_counter()\n"
        "print(json.dumps({'imports_s': round(t1 - t0, 2), 'model_load_s': round(t2 - t1, 2)}))"
    )
    from serving.spec import ModelServeSpec

    name, version = model_uri.removeprefix("models:/").split("/")
    spec = ModelServeSpec(
        app_name="timing", route_prefix="/timing", model_uri=model_uri, model_name=name, model_version=version,
        tracking_uri=settings.tracking_uri, registry_uri=settings.registry_uri, flavor="pytorch",
    )  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", code, spec.model_dump_json()], capture_output=True, text=True, cwd=ROOT, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def llm_profile(record: Any, steps: list[int], hold_s: float) -> dict[str, Any]:
    """Closed-loop completions at each step of clients; replicas and the engine's queue over time."""
    import httpx

    body = json.dumps({"model": record.model_name, "prompt": "nodewise serves", "max_tokens": 16}).encode()
    sampler, engine = Sampler(record.app_name), []  # (time, waiting, running) of the replica that answered
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
                batch = httpx.get(f"{record.endpoint}/health", timeout=2).json()["engine"]
                engine.append((time.time(), batch["blocked"], batch["running"]))
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    rows, clients = [], []
    try:
        for n in steps:
            begun = time.time()
            client = LoadClient(f"{record.endpoint}/v1/completions", body, n)
            client.start()
            clients.append(client)
            if len(clients) > 1:
                clients[-2].stop()
            time.sleep(hold_s)
            ended = time.time()
            inside = [r for t, r, _ in sampler.samples if begun <= t <= ended]
            queue = [(w, r) for t, w, r in engine if begun <= t <= ended]
            rows.append(
                {
                    "clients": n,
                    "replicas_at_start": inside[0] if inside else None,
                    "replicas_peak": max(inside, default=0),
                    "first_added_after_s": next(
                        (round(t - begun, 1) for t, r, _ in sampler.samples if begun <= t <= ended and r > inside[0]),
                        None,
                    )
                    if inside
                    else None,
                    "engine_blocked_max": max((w for w, _ in queue), default=None),
                    "engine_running_max": max((r for _, r in queue), default=None),
                    "requests": sum(begun <= o.at <= ended for o in client.log),
                    "failed": sum(not o.ok for o in client.log),
                }
            )
            print(f"  llm c={n}: {rows[-1]}", file=sys.stderr, flush=True)
    finally:
        for client in clients:
            client.stop()
        stop.set()
        watcher.join(5)
        sampler.stop()
    added_without_queue = [
        r["clients"] for r in rows if r["replicas_peak"] > (r["replicas_at_start"] or 0) and not r["engine_blocked_max"]
    ]
    return {"steps": rows, "replicas_added_without_a_queue": added_without_queue}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def series(
    log: list[tuple[float, str, float]],
    samples: list[tuple[float, int, int]],
    t0: float,
    nodes: list[tuple[float, int]] | None = None,
) -> list[dict]:
    """Per 5 s window from ``t0``: requests/s, p99 ms, failures, the most replicas running and Ray nodes alive."""
    end = max([t for t, _, _ in log] + [t for t, _, _ in samples] + [t0])
    rows: list[dict] = []
    start = t0
    while start < end:
        stop = start + 5
        lats = [s for t, o, s in log if start <= t < stop]
        # a window past the last sample keeps the last count seen
        reps = [r for t, r, _ in samples if start <= t < stop] or [rows[-1]["replicas"] if rows else 0]
        rows.append(
            {
                "t_s": round(start - t0),
                "req_per_s": round(len(lats) / 5, 1),
                "p99_ms": round(percentile(lats, 99) * 1000, 1),
                "failed": sum(o != "200" for t, o, _ in log if start <= t < stop),
                "replicas": max(reps, default=0),
                "nodes": max([n for t, n in nodes or [] if start <= t < stop] or [rows[-1]["nodes"] if rows else 0]),
            }
        )
        start = stop
    return rows


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 5.5))
    for name, figures in results.items():
        rows = figures["windows"]
        xs = [r["t_s"] for r in rows]
        top.step(xs, [r["replicas"] for r in rows], where="post", label=f"{name}: replicas")
        if any(r.get("nodes", 1) > 1 for r in rows):
            top.step(xs, [r["nodes"] for r in rows], where="post", linestyle="--", label=f"{name}: Ray nodes")
        bottom.plot(xs, [r["req_per_s"] for r in rows], marker=".", label=name)
    top.set_ylabel("replicas running / nodes")
    top.set_title("demo MLP, a load step: replicas and throughput per 5 s window")
    top.legend()
    bottom.set_ylabel("requests/s")
    bottom.set_xlabel("seconds from the start of the profile")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--min", type=int, default=1)
    parser.add_argument("--max", type=int, default=None, help="max_replicas (default: settings', capped by the plan)")
    parser.add_argument("--target", type=float, default=None, help="target_ongoing_requests (default: settings')")
    parser.add_argument("--upscale-delay", type=float, default=None)
    parser.add_argument("--downscale-delay", type=float, default=None)
    parser.add_argument("--idle", type=float, default=10.0)
    parser.add_argument("--hold", type=float, default=60.0)
    parser.add_argument("--tail", type=float, default=20.0, help="seconds at the end of the hold for throughput")
    parser.add_argument("--settle", type=float, default=180.0)
    parser.add_argument("--out", type=Path, default=Path("autoscale.json"))
    parser.add_argument(
        "--added-nodes", type=int, default=0, help="nodes Ray's autoscaler may add (ray.max_added_nodes); 0: none"
    )
    parser.add_argument("--head-cpus", type=int, default=2, help="CPUs the head node offers (ray.num_cpus)")
    parser.add_argument("--zero-idle", type=float, default=2.0, help="downscale delay of the scale-to-zero model")
    parser.add_argument("--llm", action="store_true", help="only the LLM profile (the tiny Llama, engine autoscaling)")
    parser.add_argument("--llm-steps", default="1,16,48", help="clients at each step of the LLM profile")
    parser.add_argument("--llm-hold", type=float, default=40.0, help="seconds at each step of the LLM profile")
    args = parser.parse_args()
    if args.llm:
        llm_main(args)
        return

    from benchmarks._instance import local_instance
    from nodewise.core.settings import using_settings
    from nodewise.demo_models import digits_split, register_demo_model

    _, _, x_test, _ = digits_split()
    body = json.dumps({"inputs": x_test[:1].tolist()}).encode()
    auto = {"min_replicas": args.min, **({"max_replicas": args.max} if args.max else {})}
    for key, value in (("target_ongoing_requests", args.target), ("upscale_delay_s", args.upscale_delay),
                       ("downscale_delay_s", args.downscale_delay)):  # fmt: skip
        if value is not None:
            auto[key] = value
    results: dict[str, dict] = {}
    ray = {"num_cpus": args.head_cpus, "max_added_nodes": args.added_nodes, "idle_node_timeout_s": 10}
    with local_instance("nwa-", 24410, ray=ray) as settings:
        from flows.deploy import deploy_model

        root = str(settings.state.artifacts)
        for name, serve in (("fixed", {"replicas": args.min}), ("autoscaled", auto)):
            model = register_demo_model(root, name=f"digits-{name}")
            run_settings = settings.model_copy(update={"serve": settings.serve.model_copy(update=serve)})
            with using_settings(run_settings):
                record = deploy_model(f"models:/{model.name}/{model.version}")
            results[name] = profile(record, body, args, args.min)
            if name == "autoscaled":
                results[name]["max_replicas"] = record.spec["max_replicas"]
                results[name]["ceiling"] = record.spec.get("ceiling_reason")
                results[name]["start_parts"] = start_parts(record.model_uri, settings)
            brief = {k: v for k, v in results[name].items() if k != "windows"}
            print(f"{name}: {brief}", file=sys.stderr, flush=True)
        used = run_settings.serve
        zero = {"min_replicas": 0, "max_replicas": 1, "downscale_delay_s": args.zero_idle}
        model = register_demo_model(root, name="digits-zero")
        with using_settings(settings.model_copy(update={"serve": settings.serve.model_copy(update=zero)})):
            record = deploy_model(f"models:/{model.name}/{model.version}")
        cold = cold_start(record, body)
        print(f"scale to zero: {cold}", file=sys.stderr, flush=True)
    png = args.out.with_suffix(".png")
    plot(results, png)
    args.out.write_text(json.dumps(results, indent=1))
    a, f = results["autoscaled"], results["fixed"]
    summary = {
        "benchmark": "autoscale",
        "clients": args.clients,
        "nodes": {"head_cpus": args.head_cpus, "max_added_nodes": args.added_nodes},
        "autoscaling": {
            "min_replicas": args.min,
            "max_replicas": a.get("max_replicas"),
            "ceiling": a.get("ceiling"),
            "target_ongoing_requests": used.target_ongoing_requests,
            "upscale_delay_s": used.upscale_delay_s,
            "downscale_delay_s": used.downscale_delay_s,
        },
        **{name: {k: v for k, v in r.items() if k != "windows"} for name, r in results.items()},
        "scale_to_zero": cold,
        "throughput_ratio_tail": round(a["tail_req_per_s"] / max(f["tail_req_per_s"], 1e-9), 2),
        "plot": str(png),
        "series": str(args.out),
        "targets": {
            "zero_failed": a["failed"] == 0 and f["failed"] == 0,
            "new_replica_within_15s": (a["step_to_new_replica_running_s"] or 1e9) <= 15,
            "throughput_1_8x": a["tail_req_per_s"] >= 1.8 * f["tail_req_per_s"],
        },
    }
    print(json.dumps(summary))


def llm_main(args: argparse.Namespace) -> None:
    """The LLM profile alone (``--llm``): the tiny Llama deployed with the default autoscaling."""
    from mlflow import MlflowClient

    from benchmarks._instance import local_instance
    from nodewise.core.settings import using_settings
    from nodewise.demo_models import build_llama, log_llama

    steps = [int(n) for n in args.llm_steps.split(",")]
    with local_instance("nwa-llm-", 24430) as settings:
        from flows.deploy import deploy_model

        model, tokenizer = build_llama()
        experiment = MlflowClient().create_experiment("llm", artifact_location=settings.state.artifacts.as_uri())
        version = log_llama(model, tokenizer, "tiny-llama", experiment)
        with using_settings(settings):
            record = deploy_model(f"models:/tiny-llama/{version}")
        result = llm_profile(record, steps, args.llm_hold)
        spec = record.spec
    summary = {
        "benchmark": "autoscale-llm",
        "model": "tiny Llama (hidden 256, 4 layers, random weights), CPU",
        "autoscaling": {
            "min_replicas": spec["min_replicas"],
            "max_replicas": spec["max_replicas"],
            "ceiling": spec.get("ceiling_reason"),
            "max_batch": spec["max_batch_size"],
            "token_budget": spec.get("max_tokens_in_flight"),
        },
        "hold_s": args.llm_hold,
        **result,
        "targets": {"no_replica_added_without_a_queue": result["replicas_added_without_a_queue"] == []},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
