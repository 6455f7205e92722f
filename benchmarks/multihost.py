"""The multi-node backend across real network hosts: speed against one host, node loss, partition.

One run on this machine, with three network namespaces on a bridge as hosts (testkit/hosts.py;
mpirun reaches them through its remote-shell agent, ranks talk gloo over TCP between them):
1. TP=2 on one host (this machine, shared-memory all-reduce) against TP=2 across two hosts,
   side by side: launch to every rank ready, ``POST /invocations`` (``--seq`` token ids) and
   ``POST /generate`` (16 tokens) p50, end to end and the ranks' own compute (Server-Timing).
   The demo's LM (hidden 256, 4 layers).
2. Faults under steady clients through the deployment's endpoint (its front, issue 32): whole
   ``/invocations`` and streamed greedy ``/generate``, each stream checked token for token
   against an undisturbed one. For each fault: requests failed and why, the longest wait a
   client saw (target: the group back + 2 s), the front's holds, repeats and continued streams.
   - a rank killed (SIGKILL of rank 1, its host alive): mpirun exits, the
     ``nodewise.cluster.exited`` event in Prefect's API runs a watchdog pass (what prefect.yaml's
     trigger does through a flow run), the group restarts;
   - node loss: every process of rank 1's host killed and the host off the network; the same
     event, the group restarts on the spare host;
   - partition: rank 1's host loses its link (ranks live on, unreachable). The watchdog loops
     every ``--every`` s; processes left on the cut host once it is back.
At the end, every job stopped: processes left on any host (target 0).

Usage: .venv/bin/python benchmarks/multihost.py [--requests 60] [--seq 32] [--every 10] [--clients 2]
[--faults-only]
(needs root; last line: one JSON object)
"""

from __future__ import annotations

import argparse
import asyncio
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

from benchmarks.deepspeed_cluster import bench_spec, latencies  # noqa: E402
from benchmarks.faults import Watchdog  # noqa: E402
from testkit import LoadClient  # noqa: E402


def launch_timed(spec: Any, hosts: list[str], settings: Any) -> tuple[Any, float]:
    from tasks.mpi.health import wait_ready
    from tasks.mpi.launcher import launch

    start = time.monotonic()
    cluster = launch(spec, hosts, 1, settings)
    try:
        wait_ready(cluster, 900)
    except Exception:
        shutil.copy(cluster.log_path, f"/tmp/multihost-failed-launch-{int(time.time())}.log")  # kept to look at
        raise
    return cluster, time.monotonic() - start


def speed(spec: Any, settings: Any, lan: Any, seq: int, n: int) -> dict:
    from tasks.mpi.launcher import stop_cluster

    ids = [[(i % 90) + 3 for i in range(seq)]]
    out: dict = {}
    for label, hosts in (("same_host", ["localhost", "localhost"]), ("cross_host", lan.addresses[:2])):
        cluster, ready_s = launch_timed(spec, hosts, settings)
        try:
            out[label] = {
                "hosts": hosts,
                "ready_s": round(ready_s, 2),
                "forward": latencies(cluster.endpoint, "/invocations", {"inputs": ids}, n),
                "generate16": latencies(cluster.endpoint, "/generate", {"input_ids": ids, "max_new_tokens": 16}, 15),
            }
        finally:
            stop_cluster(settings, spec.app_name)
        print(json.dumps({label: out[label]}), file=sys.stderr, flush=True)
    for what in ("forward", "generate16"):
        same, cross = out["same_host"][what]["p50_ms"], out["cross_host"][what]["p50_ms"]
        out[f"{what}_p50_ratio"] = round(cross / same, 2)
    return out


class ExitedSubscriber:
    """Runs a watchdog pass as soon as Prefect's API has a ``nodewise.cluster.exited`` event."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.received: list[tuple[float, dict]] = []
        self.passes: list[tuple[float, float, list[Any]]] = []  # (started, ended, actions)
        self._ready = threading.Event()
        threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True).start()
        self._ready.wait(30)

    async def _run(self) -> None:
        from prefect.events.clients import get_events_subscriber
        from prefect.events.filters import EventFilter, EventNameFilter

        from tasks.watchdog.engine import watch_once

        event_filter = EventFilter(event=EventNameFilter(name=["nodewise.cluster.exited"]))
        async with get_events_subscriber(filter=event_filter) as subscriber:
            self._ready.set()
            async for event in subscriber:
                self.received.append((time.time(), event.model_dump(mode="json")))
                started = time.time()
                actions = await asyncio.to_thread(watch_once, self.settings)
                self.passes.append((started, time.time(), actions))


WHOLE = {"inputs": [[5, 17, 33, 60, 2, 9]]}
STREAMED = {"input_ids": [[5, 17, 33, 60, 2, 9]], "max_new_tokens": 24, "stream": True}
FRONT_COUNTERS = ("holds", "retries", "streams_continued", "hold_timeouts")


def stream_tokens(text: str) -> tuple[list[int], str | None]:
    """The token ids of a ``/generate`` stream, and what is wrong with it (no ``[DONE]``, an error)."""
    tokens, done = [], False
    for line in text.splitlines():
        data = line.removeprefix("data: ")
        if not line.startswith("data: "):
            continue
        if data == "[DONE]":
            done = True
            continue
        chunk = json.loads(data)
        if "error" in chunk:
            return tokens, f"error event: {chunk['error']}"
        if "token_id" in chunk:
            tokens.append(int(chunk["token_id"]))
    return tokens, None if done else "ended without [DONE]"


class Loads:
    """Steady clients through the deployment's endpoint (the front): whole ``/invocations`` and
    streamed greedy ``/generate``, each stream checked token for token against an undisturbed one."""

    def __init__(self, endpoint: str, clients: int) -> None:
        import httpx

        self.endpoint = endpoint
        expected, wrong = stream_tokens(httpx.post(f"{endpoint}/generate", json=STREAMED, timeout=60).text)
        if wrong or not expected:
            raise RuntimeError(f"the undisturbed stream is not whole: {wrong or 'no tokens'}")
        self.expected = expected

        def same(response: Any) -> str | None:
            tokens, wrong = stream_tokens(response.text)
            if wrong is None and tokens != self.expected:
                wrong = f"tokens {tokens} differ from the undisturbed {self.expected}"
            return wrong

        whole, streamed = json.dumps(WHOLE).encode(), json.dumps(STREAMED).encode()
        self.loads = {
            "whole": LoadClient(f"{endpoint}/invocations", whole, clients, timeout_s=150, backoff_s=0.1),
            "streamed": LoadClient(
                f"{endpoint}/generate", streamed, clients, timeout_s=150, backoff_s=0.1, check=same, stream=True
            ),
        }

    def start(self) -> None:
        for load in self.loads.values():
            load.start()

    def stop(self) -> None:
        for load in self.loads.values():
            load.stop()

    def counters(self) -> dict[str, float]:
        """The front's counters (its ``/metrics``), summed over labels."""
        import httpx

        text = httpx.get(f"{self.endpoint}/metrics", timeout=10).text
        out = dict.fromkeys(FRONT_COUNTERS, 0.0)
        for line in text.splitlines():
            for name in FRONT_COUNTERS:
                if line.startswith(f"nodewise_front_{name}_total"):
                    out[name] += float(line.rsplit(" ", 1)[1])
        return out

    def figures(self, since: float, until: float) -> dict[str, Any]:
        """Per client: requests that ended in the window, failed (and why), the longest wait (a
        whole request's latency; a stream's longest stall between its bytes, its head first)."""
        out = {}
        for name, load in self.loads.items():
            window = load.outcomes_between(since, until)
            failed = [o for o in window if not o.ok]
            waits = [o.longest_gap_s if load.stream else o.latency_s for o in window]
            out[name] = {
                "requests": len(window),
                "failed": len(failed),
                "wrong_answers": sum(o.outcome == "wrong" for o in failed),
                "longest_wait_s": round(max(waits, default=0.0), 2),
                "longest_request_s": round(max((o.latency_s for o in window), default=0.0), 2),
                "first_failures": [f"{o.outcome} {o.detail}"[:160] for o in failed[:3]],
            }
        return out


def under_fault(
    settings: Any, record: Any, clients: int, inject: Any, repaired: Any, settle_s: float = 8.0
) -> dict[str, Any]:
    """Steady clients through the front; ``inject()`` the fault; ``repaired(fault_at)`` waits for
    the watchdog's restart and returns (when the group was back, the restart action); then the
    clients run ``settle_s`` more so every request held or repeated is answered or failed."""
    loads = Loads(record.endpoint, clients)
    before = loads.counters()
    loads.start()
    time.sleep(3)
    fault_at = time.time()
    inject()
    back_at, action = repaired(fault_at)
    time.sleep(settle_s)
    loads.stop()
    after = loads.counters()
    figures = loads.figures(fault_at, time.time())
    back_s = round(back_at - fault_at, 1)
    longest = max(f["longest_wait_s"] for f in figures.values())
    return {
        "group_back_after_fault_s": back_s,
        "restart_s": getattr(action, "duration_s", None),
        "cause": getattr(action, "cause", None),
        "hosts_before": getattr(action, "hosts_before", None),
        "hosts_after": getattr(action, "hosts_after", None),
        "clients": figures,
        "front": {k: after[k] - before[k] for k in FRONT_COUNTERS},
        "longest_wait_s": longest,
        "target_longest_wait_s": round(back_s + 2, 1),
        "longest_wait_met": longest <= back_s + 2,
        "failed_met": all(f["failed"] == 0 for f in figures.values()),
    }


def on_exit_event(subscriber: ExitedSubscriber) -> Any:
    """``repaired`` for a fault that ends mpirun: the exited event runs a watchdog pass."""

    def repaired(fault_at: float) -> tuple[float, Any]:
        deadline = time.time() + 180
        while time.time() < deadline:
            done = [p for p in subscriber.passes if p[0] >= fault_at]
            restarts = [a for _, _, actions in done for a in actions if a.event == "nodewise.cluster.restarted"]
            if restarts:
                return next(ended for _, ended, actions in done if restarts[0] in actions), restarts[0]
            time.sleep(0.1)
        raise RuntimeError(f"no restart within 180 s of the fault; passes: {subscriber.passes}")

    return repaired


def node_loss(settings: Any, lan: Any, record: Any, clients: int, subscriber: ExitedSubscriber) -> dict:
    """Every process of rank 1's host killed and the host off the network."""
    from tasks.mpi.records import read_cluster

    victim = next(h for h in lan.hosts if h.address == read_cluster(settings, record.app_name).hosts[1])
    result = under_fault(settings, record, clients, lambda: lan.kill_host(victim), on_exit_event(subscriber))
    lan.revive(victim)
    return {"host": victim.address, **result}


def killed_rank(settings: Any, record: Any, clients: int, subscriber: ExitedSubscriber) -> dict:
    """One rank's process SIGKILLed, its host alive: mpirun ends the job, the group restarts."""
    import os
    import signal

    import httpx

    from tasks.mpi.records import read_cluster

    health = httpx.get(f"{read_cluster(settings, record.app_name).endpoint}/health", timeout=10).json()
    pid = health["ranks"][1]["pid"]  # rank 0 answers for every rank
    return under_fault(settings, record, clients, lambda: os.kill(pid, signal.SIGKILL), on_exit_event(subscriber))


def partition(settings: Any, lan: Any, record: Any, every_s: float, clients: int) -> dict:
    from tasks.mpi.records import read_cluster

    cluster = read_cluster(settings, record.app_name)
    victim = next(h for h in lan.hosts if h.address == cluster.hosts[1])
    dog = Watchdog(settings, every_s)

    def repaired(fault_at: float) -> tuple[float, Any]:
        return dog.wait_for("nodewise.cluster.restarted", fault_at, timeout_s=300)

    try:
        result = under_fault(settings, record, clients, lambda: lan.cut(victim), repaired)
        left_while_cut = len(victim.pids())
        lan.mend(victim)
        time.sleep(every_s + 5)  # one pass reaches the host again and stops what was left there
    finally:
        dog.stop()
    return {
        "host": victim.address,
        "target_detect_s": every_s + settings.watchdog.canary_timeout_s,  # one period + the canary's deadline
        **result,
        "processes_on_cut_host_while_cut": left_while_cut,
        "processes_on_cut_host_after_it_returned": len(victim.pids()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--every", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=2, help="clients of each kind (whole and streamed)")
    parser.add_argument("--faults-only", action="store_true", help="skip the speed comparison")
    args = parser.parse_args()

    from prefect.testing.utilities import prefect_test_harness

    from testkit import hosts as netns

    if not netns.available():
        sys.exit(netns.why_unavailable())
    state = Path(tempfile.mkdtemp(prefix="nw-bench-mh-", dir="/tmp"))
    results: dict = {"model": "llama hidden=256 layers=4 heads=4 vocab=98, fp32, CPU; 1 rank per host"}
    with netns.hosts(3) as lan, prefect_test_harness(server_startup_timeout=120):
        from mlflow import MlflowClient
        from prefect.settings import PREFECT_API_URL

        from nodewise.core.runtime import configure_process
        from nodewise.core.settings import Settings
        from nodewise.demo_models import build_llama, log_llama, too_small_inventory
        from nodewise.ops.status import stop_everything
        from tasks.planning.profile_models import profile_with_cache
        from tasks.planning.registry import resolve_model
        from testkit.flows import deploy_model

        settings = Settings(
            state_dir=state,
            prefect={"api_url": PREFECT_API_URL.value()},
            deepspeed={
                "port": 8191,
                "remote_shell": str(lan.agent),
                "mpirun_args": lan.mpirun_args(),
                "host_check_timeout_s": 3,
                "stop_grace_s": 3,
            },
            watchdog={"canary_timeout_s": 5, "backoff_s": 0},
        )
        configure_process(settings)
        try:
            model, tokenizer = build_llama()
            experiment = MlflowClient().create_experiment("bench", artifact_location=settings.state.artifacts.as_uri())
            version = log_llama(model, tokenizer, "bench-llama", experiment)
            resolved = resolve_model(f"models:/bench-llama/{version}", MlflowClient())
            spec = bench_spec(resolved, settings, host="0.0.0.0")
            if not args.faults_only:
                launch_timed(spec, ["localhost", "localhost"], settings)  # builds the op cache once, untimed
                from tasks.mpi.launcher import stop_cluster

                stop_cluster(settings, "bench")
                results["speed"] = speed(spec, settings, lan, args.seq, args.requests)

            profile = profile_with_cache(resolved, batch_size=settings.serve.max_batch_size, device="cpu")
            inventory = too_small_inventory(
                state / "nodes.yaml", profile.total_bytes, profile.per_rank_bytes(2), 0.9, lan.addresses
            )
            record = deploy_model(resolved.pinned_uri, inventory=inventory, settings=settings)
            subscriber = ExitedSubscriber(settings)  # one for both faults that end mpirun
            results["killed_rank"] = killed_rank(settings, record, args.clients, subscriber)
            print(json.dumps({"killed_rank": results["killed_rank"]}), file=sys.stderr, flush=True)
            results["node_loss"] = node_loss(settings, lan, record, args.clients, subscriber)
            print(json.dumps({"node_loss": results["node_loss"]}), file=sys.stderr, flush=True)
            results["partition"] = partition(settings, lan, record, args.every, args.clients)
        finally:
            stop_everything(settings)
            time.sleep(3)  # an orted whose mpirun is gone exits ~2 s after its ranks
            results["processes_left_on_hosts_after_stop"] = {h: len(p) for h, p in lan.leftovers().items()}
            shutil.rmtree(state, ignore_errors=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
