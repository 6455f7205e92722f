"""Faults under a steady load: how fast the watchdog detects and repairs them, and what clients lose.

One run on this machine, a fresh state folder, the watchdog looping every ``--every`` seconds
(as ``nodewise watchdog --every`` does) while a closed-loop client (``--clients`` threads) posts
to the endpoint the whole time. Faults, each injected into one real process:
- Ray Serve, 2 replicas of a small pyfunc model (testkit/models.py ``FaultOnFlag``):
  a hung replica (SIGSTOP), a replica failing every request, a replica leaking memory past
  ``memory_limit_bytes``, a replica killed (SIGKILL: Serve replaces it, the watchdog records
  ``nodewise.replica.replaced``; HAProxy sends its in-flight requests again, serve.retries);
- DeepSpeed, a tiny Llama on 2 ranks under mpirun: ``kill -9`` of rank 1.
For each: time to detect (fault -> the watchdog acts), time to recover (fault -> the
replacement is running / every rank ready), requests failed from the fault until recovery (a
client waits 0.1 s after a failed request before its next one).
Peer, side by side in the same run: Ray Serve on its own (no watchdog, its own health check
every 5 s with a 30 s timeout) for the hung and the failing replica, over the same kind of
window. The leaking replica has no peer run: left alone it grows until the machine runs out.

Usage: .venv/bin/python benchmarks/faults.py [--every 10] [--clients 4] [--peer-window 150]
       [--faults hung,failing,leaking,killed] [--no-peer] [--no-deepspeed]
(last line: one JSON object)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from testkit import LoadClient, serve_replicas  # noqa: E402

BODY = json.dumps({"inputs": [[1.0, 2.0, 3.0]]}).encode()
LIMIT = 900 * 2**20


class Watchdog:
    """``watch_once`` every ``every_s`` seconds in a thread; each action kept with its time."""

    def __init__(self, settings: Any, every_s: float) -> None:
        self.settings, self.every_s = settings, every_s
        self.actions: list[tuple[float, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from tasks.watchdog.engine import watch_once

        while not self._stop.is_set():
            started = time.monotonic()
            watch_once(self.settings, emit=lambda a: self.actions.append((time.time(), a)))
            self._stop.wait(max(0.0, self.every_s - (time.monotonic() - started)))

    def wait_for(self, event: str, since: float, timeout_s: float = 240) -> tuple[float, Any]:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            for at, action in self.actions:
                if at >= since and action.event == event:
                    return at, action
            time.sleep(0.2)
        raise RuntimeError(f"no {event} within {timeout_s:.0f} s; actions: {[a for _, a in self.actions]}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(300)


def replicas(app: str) -> dict[str, dict]:
    return {r["replica_id"]: r for r in serve_replicas(app)}


def running(app: str) -> int:
    return sum(r["state"] == "RUNNING" for r in serve_replicas(app))


def watched(load: LoadClient, dog: Watchdog, inject: Any, event: str = "nodewise.replica.restarted") -> dict:
    """Inject a fault; time the watchdog's detection and repair; count the requests lost."""
    fault_at = time.time()
    inject()
    acted_at, action = dog.wait_for(event, fault_at)
    took = action.duration_s or 0.0
    time.sleep(1)
    failed, total = load.failed_between(fault_at, acted_at + 1)
    return {
        "detect_s": round(acted_at - took - fault_at, 1),
        "recover_s": round(acted_at - fault_at, 1),
        "restart_s": took,
        "failed_requests": failed,
        "requests": total,
        "cause": action.cause,
    }


def serve_alone_hung(load: LoadClient, app: str, window_s: float) -> dict:
    """Ray Serve without the watchdog: SIGSTOP one replica, wait for Serve to replace it."""
    victim = next(r for r in replicas(app).values() if r["pid"])
    fault_at = time.time()
    os.kill(victim["pid"], signal.SIGSTOP)
    deadline = fault_at + window_s
    while time.time() < deadline:
        if victim["replica_id"] not in replicas(app) and running(app) >= 2:
            break
        time.sleep(0.25)
    end = time.time()
    replaced = victim["replica_id"] not in replicas(app)
    if not replaced:
        os.kill(victim["pid"], signal.SIGKILL)  # our clean-up, not Serve's: leave the next fault a fair start
        while running(app) < 2 or victim["replica_id"] in replicas(app):
            time.sleep(0.25)
    failed, total = load.failed_between(fault_at, end)
    return {
        "replaced": replaced,
        "recover_s": round(end - fault_at, 1) if replaced else None,
        "failed_requests": failed,
        "requests": total,
    }


def serve_alone_failing(load: LoadClient, app: str, flags: Path, window_s: float) -> dict:
    """Ray Serve without the watchdog: one replica fails every request for ``window_s``."""
    victim = next(iter(replicas(app).values()))
    fault_at = time.time()
    (flags / f"{victim['pid']}.fail").touch()
    time.sleep(window_s)
    replaced = victim["replica_id"] not in replicas(app)
    (flags / f"{victim['pid']}.fail").unlink()  # heal it for the next fault
    failed, total = load.failed_between(fault_at, fault_at + window_s)
    return {"replaced": replaced, "window_s": window_s, "failed_requests": failed, "requests": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=float, default=10.0, help="seconds between watchdog passes")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--peer-window", type=float, default=150.0, help="how long Ray Serve alone gets")
    parser.add_argument("--leak-mib", type=float, default=0.5, help="MiB the leaking replica keeps per request")
    parser.add_argument("--no-deepspeed", action="store_true")
    parser.add_argument("--faults", default="hung,failing,leaking,killed", help="the Ray Serve faults to inject")
    parser.add_argument("--no-peer", action="store_true", help="skip the Ray Serve alone windows")
    args = parser.parse_args()
    faults = [f for f in args.faults.split(",") if f]
    unknown = sorted(set(faults) - {"hung", "failing", "leaking", "killed"})
    if unknown:
        parser.error(f"--faults: unknown {', '.join(unknown)}; choose from hung, failing, leaking, killed")

    from benchmarks._instance import local_instance
    from nodewise.core.settings import using_settings

    result: dict[str, Any] = {"benchmark": "faults", "watchdog_every_s": args.every, "clients": args.clients}
    watchdog = {"every_s": args.every, "canary_timeout_s": 5, "backoff_s": 0, "max_restarts": 20}
    serve = {"replicas": 2, "memory_limit_bytes": LIMIT}
    with local_instance("nwf-", 24310, serve=serve, watchdog=watchdog) as settings:
        from flows.deploy import deploy_model
        from testkit.models import FaultOnFlag, register_pyfunc

        flags = settings.state.root / "flags"
        flags.mkdir()
        uri = register_pyfunc(FaultOnFlag(str(flags)), "faulty", str(settings.state.artifacts))
        with using_settings(settings):
            record = deploy_model(uri)
        app = record.app_name
        load = LoadClient(f"{record.endpoint}/invocations", BODY, args.clients, backoff_s=0.1)
        load.start()
        time.sleep(3)
        peer: dict[str, Any] = {}
        if not args.no_peer and "hung" in faults:
            peer["hung"] = serve_alone_hung(load, app, args.peer_window)
        if not args.no_peer and "failing" in faults:
            peer["failing"] = serve_alone_failing(load, app, flags, 30)
        print(f"Ray Serve alone: {peer}", file=sys.stderr, flush=True)

        dog = Watchdog(settings, args.every)
        time.sleep(1)

        def pick() -> dict:
            return next(r for r in replicas(app).values() if r["pid"])

        injections = {
            "hung": lambda v: os.kill(v["pid"], signal.SIGSTOP),
            "failing": lambda v: (flags / f"{v['pid']}.fail").touch(),
            "leaking": lambda v: (flags / f"{v['pid']}.leak").write_text(str(args.leak_mib)),
            "killed": lambda v: os.kill(v["pid"], signal.SIGKILL),
        }
        ours: dict[str, Any] = {}
        for fault in faults:
            victim = pick()
            event = "nodewise.replica.replaced" if fault == "killed" else "nodewise.replica.restarted"
            ours[fault] = watched(load, dog, lambda v=victim, f=fault: injections[f](v), event)
            while running(app) < 2:  # the next fault on a full app
                time.sleep(0.25)
        print(f"nodewise watchdog: {ours}", file=sys.stderr, flush=True)
        load.stop()
        result.update({"ray_serve": {"nodewise": ours, "ray_serve_alone": peer}})
        if not args.no_deepspeed:
            result["deepspeed"] = deepspeed_fault(settings, dog, args.clients)
        dog.stop()
    targets = result.get("ray_serve", {}).get("nodewise", {})
    hung = targets.get("hung", {})
    result["targets"] = {}
    if "hung" in targets:
        result["targets"]["hung_detected_within_period_plus_canary"] = hung["detect_s"] <= args.every + 5
        result["targets"]["hung_failed_none"] = hung["failed_requests"] == 0  # issue 32: serve.retries resends
    if "killed" in targets:
        result["targets"]["killed_failed_none"] = targets["killed"]["failed_requests"] == 0
    if "deepspeed" in result:
        result["targets"]["rank_back_within_30s_of_detection"] = result["deepspeed"]["back_after_detect_s"] <= 30
    print(json.dumps(result))


def deepspeed_fault(settings: Any, dog: Watchdog, clients: int) -> dict:
    """``kill -9`` of rank 1 of a 2-rank job under load; the watchdog restarts every rank."""
    import httpx

    from testkit.lm import deploy_on_two_ranks, rank_pids, register_tiny_llama

    record = deploy_on_two_ranks(settings, register_tiny_llama(settings, "faults"))
    body = json.dumps({"inputs": [[5, 17, 33, 60, 2, 9]]}).encode()
    load = LoadClient(f"{record.endpoint}/invocations", body, clients, backoff_s=0.1)
    load.start()
    time.sleep(3)
    fault_at = time.time()
    os.kill(rank_pids(record.endpoint)[1], signal.SIGKILL)
    acted_at, action = dog.wait_for("nodewise.cluster.restarted", fault_at)
    back = None  # the first answer after the outage (the first failed request after the kill)
    while back is None and time.time() < acted_at + 60:
        since = load.outcomes_between(fault_at)
        down = next((o.at for o in since if not o.ok), None)
        if down is not None:
            back = next((o.at for o in since if o.at > down and o.ok), None)
        time.sleep(0.1)
    load.stop()
    failed, total = load.failed_between(fault_at, back or time.time())
    detect = acted_at - (action.duration_s or 0) - fault_at
    httpx.get(f"{record.endpoint}/ping", timeout=5).raise_for_status()
    return {
        "detect_s": round(detect, 1),
        "restart_s": action.duration_s,
        "back_serving_s": round((back or float("nan")) - fault_at, 1),
        "back_after_detect_s": round((back or float("nan")) - fault_at - detect, 1),
        "failed_requests": failed,
        "requests": total,
        "cause": action.cause,
        "peer": "mpirun alone (or an MPIJob with restartPolicy Never): the job exits within ~1 s and stays down",
    }


if __name__ == "__main__":
    main()
