"""The multi-node backend across real network hosts: speed against one host, node loss, partition.

One run on this machine, with three network namespaces on a bridge as hosts (tests/support/hosts.py;
mpirun reaches them through its remote-shell agent, ranks talk gloo over TCP between them):
1. TP=2 on one host (this machine, shared-memory all-reduce) against TP=2 across two hosts,
   side by side: launch to every rank ready, ``POST /invocations`` (``--seq`` token ids) and
   ``POST /generate`` (16 tokens) p50, end to end and the ranks' own compute (Server-Timing).
   The demo's LM (hidden 256, 4 layers).
2. Node loss under a steady client: every process of rank 1's host killed and the host taken off
   the network. Timed: the fault -> mpirun's exit (the supervisor's record) -> the
   ``nodewise.cluster.exited`` event in Prefect's API -> a subscriber of that event running the
   watchdog pass (what prefect.yaml's trigger does through a flow run) -> every rank ready on
   the spare host -> the first answer. Requests failed, hosts before and after.
3. Partition: rank 1's new host loses its link (ranks live on, unreachable). The watchdog loops
   every ``--every`` s; timed: fault -> restart begun, -> serving again; processes left on the cut
   host once it is back.
At the end, every job stopped: processes left on any host (target 0).

Usage: .venv/bin/python benchmarks/multihost.py [--requests 60] [--seq 32] [--every 10]
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
from tests.support import LoadClient  # noqa: E402


def launch_timed(spec: Any, hosts: list[str], settings: Any) -> tuple[Any, float]:
    from tasks.mpi.launcher import launch, wait_ready

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


def first_ok_after(load: LoadClient, since: float, timeout_s: float = 120) -> float | None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        after = load.outcomes_between(since)
        down = next((o.at for o in after if not o.ok), None)
        if down is not None:
            back = next((o.at for o in after if o.at > down and o.ok), None)
            if back is not None:
                return back
        time.sleep(0.1)
    return None


def node_loss(settings: Any, lan: Any, record: Any, clients: int) -> dict:
    from tasks.mpi.launcher import exited_at, read_cluster

    subscriber = ExitedSubscriber(settings)
    body = json.dumps({"inputs": [[5, 17, 33, 60, 2, 9]]}).encode()
    load = LoadClient(f"{record.endpoint}/invocations", body, clients, backoff_s=0.1)
    load.start()
    time.sleep(3)
    before = read_cluster(settings, record.app_name)
    fault_at = time.time()
    lan.kill_host(lan[1])
    deadline = time.time() + 120
    while not subscriber.passes and time.time() < deadline:
        time.sleep(0.1)
    exited = exited_at(before)  # None when the restart already replaced the record: the event says
    if exited is None and subscriber.received:
        from datetime import datetime

        exited = datetime.fromisoformat(subscriber.received[0][1]["payload"]["at"]).timestamp()
    back = first_ok_after(load, fault_at)
    load.stop()
    failed, total = load.failed_between(fault_at, back or time.time())
    received_at = subscriber.received[0][0] if subscriber.received else None
    started, _, actions = subscriber.passes[0] if subscriber.passes else (None, None, [])
    restart = next((a for a in actions if a.event == "nodewise.cluster.restarted"), None)
    return {
        "mpirun_exit_after_fault_s": round(exited - fault_at, 2) if exited else None,
        "event_received_after_exit_s": round(received_at - exited, 2) if received_at and exited else None,
        "watchdog_acting_after_exit_s": round(started - exited, 2) if started and exited else None,
        "restart_s": restart.duration_s if restart else None,
        "serving_again_after_fault_s": round(back - fault_at, 1) if back else None,
        "failed_requests": failed,
        "requests": total,
        "hosts_before": restart.hosts_before if restart else None,
        "hosts_after": restart.hosts_after if restart else None,
        "cause": restart.cause if restart else [a.model_dump() for a in actions],
    }


def partition(settings: Any, lan: Any, record: Any, every_s: float, clients: int) -> dict:
    from tasks.mpi.launcher import read_cluster

    cluster = read_cluster(settings, record.app_name)
    victim = next(h for h in lan.hosts if h.address == cluster.hosts[1])
    body = json.dumps({"inputs": [[5, 17, 33, 60, 2, 9]]}).encode()
    load = LoadClient(f"{cluster.endpoint}/invocations", body, clients, backoff_s=0.1)
    load.start()
    dog = Watchdog(settings, every_s)
    time.sleep(2)
    fault_at = time.time()
    lan.cut(victim)
    acted_at, action = dog.wait_for("nodewise.cluster.restarted", fault_at, timeout_s=300)
    back = first_ok_after(load, fault_at)
    load.stop()
    failed, total = load.failed_between(fault_at, back or time.time())
    left_while_cut = len(victim.pids())
    lan.mend(victim)
    time.sleep(every_s + 5)  # one pass reaches the host again and stops what was left there
    dog.stop()
    detect = acted_at - (action.duration_s or 0) - fault_at
    return {
        "detect_s": round(detect, 1),
        "target_detect_s": every_s + settings.watchdog.canary_timeout_s,  # one period + the canary's deadline
        "restart_s": action.duration_s,
        "serving_again_after_fault_s": round(back - fault_at, 1) if back else None,
        "failed_requests": failed,
        "requests": total,
        "cause": action.cause,
        "hosts_before": action.hosts_before,
        "hosts_after": action.hosts_after,
        "processes_on_cut_host_while_cut": left_while_cut,
        "processes_on_cut_host_after_it_returned": len(victim.pids()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--every", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=2)
    args = parser.parse_args()

    from prefect.testing.utilities import prefect_test_harness

    from tests.support import hosts as netns

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
        from tests.support.flows import deploy_model

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
            launch_timed(spec, ["localhost", "localhost"], settings)  # builds the op cache once, untimed
            from tasks.mpi.launcher import stop_cluster

            stop_cluster(settings, "bench")
            results["speed"] = speed(spec, settings, lan, args.seq, args.requests)

            profile = profile_with_cache(resolved, batch_size=settings.serve.max_batch_size, device="cpu")
            inventory = too_small_inventory(
                state / "nodes.yaml", profile.total_bytes, profile.per_rank_bytes(2), 0.9, lan.addresses
            )
            record = deploy_model(resolved.pinned_uri, inventory=inventory, settings=settings)
            results["node_loss"] = node_loss(settings, lan, record, args.clients)
            print(json.dumps({"node_loss": results["node_loss"]}), file=sys.stderr, flush=True)
            lan.revive(lan[1])
            results["partition"] = partition(settings, lan, record, args.every, args.clients)
        finally:
            stop_everything(settings)
            time.sleep(3)  # an orted whose mpirun is gone exits ~2 s after its ranks
            results["processes_left_on_hosts_after_stop"] = {h: len(p) for h, p in lan.leftovers().items()}
            shutil.rmtree(state, ignore_errors=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
