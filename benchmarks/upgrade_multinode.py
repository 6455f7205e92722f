"""A multi-node DeepSpeed deployment upgraded to a new version under steady clients (issue 32 item 3).

Four network-namespace hosts (testkit/hosts.py, as in multihost.py), the demo's LM on two of
them, one rank per host, deployed through the flow. Steady clients through the deployment's front
(multihost.py's ``Loads``: whole ``/invocations`` and streamed greedy ``/generate``, each stream
checked token for token) while the flow deploys a new version (the same weights, registered
again, so every answer can be checked against an undisturbed one):
(a) room for a second group: the inventory has two hosts the running group does not use, so
    ``deepspeed.upgrade: auto`` starts the new group beside the old one (surge);
(b) no room: the inventory has one host free, so the old group stops first (replace).
For each: requests failed, the time the front held requests (its ``/front`` read every 50 ms:
how long it was not ready), requests it held (``nodewise_front_holds_total``), the longest wait a
client saw, how long the deploy took, and which hosts served before and after.

Usage: .venv/bin/python benchmarks/upgrade_multinode.py [--clients 2]
(needs root; last line: one JSON object)
"""

from __future__ import annotations

import argparse
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

from benchmarks.multihost import FRONT_COUNTERS, Loads  # noqa: E402


class HoldWatch:
    """The front's ``/front`` read every 50 ms in a thread: the seconds it was not ready."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.not_ready_s = 0.0
        self.most_held = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import httpx

        last = time.monotonic()
        while not self._stop.is_set():
            try:
                state = httpx.get(f"{self.endpoint}/front", timeout=2).json()
            except (httpx.HTTPError, ValueError):
                state = {"ready": False, "held": 0}
            now = time.monotonic()
            if not state.get("ready"):
                self.not_ready_s += now - last
            self.most_held = max(self.most_held, int(state.get("held", 0)))
            last = now
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def upgrade(settings: Any, uri: str, inventory: str, clients: int, endpoint: str) -> dict[str, Any]:
    """Deploy ``uri`` through the flow under steady clients; what they and the front saw."""
    from tasks.mpi.records import read_cluster

    before = read_cluster(settings, "bench-llama")
    loads = Loads(endpoint, clients)
    counters = loads.counters()
    loads.start()
    time.sleep(3)
    since = time.time()
    watch = HoldWatch(endpoint)
    started = time.monotonic()
    record = deploy_model(uri, inventory, settings)
    deploy_s = time.monotonic() - started
    time.sleep(5)  # every request held or repeated is answered or failed
    watch.stop()
    loads.stop()
    after = read_cluster(settings, "bench-llama")
    figures = loads.figures(since, time.time())
    front = {k: v - counters[k] for k, v in loads.counters().items() if k in FRONT_COUNTERS}
    return {
        "version": record.model_version,
        "deploy_s": round(deploy_s, 1),
        "hosts_before": before.hosts if before else None,
        "hosts_after": after.hosts if after else None,
        "beside": bool(after and Path(after.spec_path).parent.name.startswith("group-")),
        "clients": figures,
        "failed": sum(f["failed"] for f in figures.values()),
        "requests": sum(f["requests"] for f in figures.values()),
        "front_not_ready_s": round(watch.not_ready_s, 2),
        "front_most_held_at_once": watch.most_held,
        "front": front,
        "longest_wait_s": max(f["longest_wait_s"] for f in figures.values()),
    }


def deploy_model(uri: str, inventory: str, settings: Any) -> Any:
    """The deploy flow, run the way the CLI runs it (its settings through ``using_settings``)."""
    from flows.deploy import deploy_model as flow
    from nodewise.core.settings import using_settings

    with using_settings(settings):
        return flow(uri, inventory=inventory)


def inventory_of(state: Path, name: str, profile: Any, addresses: list[str]) -> str:
    from nodewise.demo_models import too_small_inventory

    return too_small_inventory(state / name, profile.total_bytes, profile.per_rank_bytes(2), 0.9, addresses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=2, help="clients of each kind (whole and streamed)")
    args = parser.parse_args()

    from prefect.testing.utilities import prefect_test_harness

    from testkit import hosts as netns

    if not netns.available():
        sys.exit(netns.why_unavailable())
    state = Path(tempfile.mkdtemp(prefix="nw-bench-upg-", dir="/tmp"))
    results: dict = {"model": "llama hidden=256 layers=4 heads=4 vocab=98, fp32, CPU; 1 rank per host, 2 hosts"}
    with netns.hosts(4) as lan, prefect_test_harness(server_startup_timeout=120):
        from mlflow import MlflowClient
        from prefect.settings import PREFECT_API_URL

        from nodewise.core.runtime import configure_process
        from nodewise.core.settings import Settings
        from nodewise.demo_models import build_llama, log_llama
        from nodewise.ops.status import stop_everything
        from tasks.planning.profile_models import profile_with_cache
        from tasks.planning.registry import resolve_model

        settings = Settings(
            state_dir=state,
            prefect={"api_url": PREFECT_API_URL.value()},
            deepspeed={
                "port": 8192,
                "remote_shell": str(lan.agent),
                "mpirun_args": lan.mpirun_args(),
                "host_check_timeout_s": 3,
                "stop_grace_s": 3,
            },
        )
        configure_process(settings)
        try:
            model, tokenizer = build_llama()
            experiment = MlflowClient().create_experiment("bench", artifact_location=settings.state.artifacts.as_uri())
            uris = [f"models:/bench-llama/{log_llama(model, tokenizer, 'bench-llama', experiment)}" for _ in range(3)]
            resolved = resolve_model(uris[0], MlflowClient())
            profile = profile_with_cache(resolved, batch_size=settings.serve.max_batch_size, device="cpu")
            a, b, c, d = lan.addresses[:4]
            roomy = inventory_of(state, "four.yaml", profile, [a, b, c, d])  # a, b run; c, d free
            first = deploy_model(uris[0], roomy, settings)
            results["room"] = upgrade(settings, uris[1], roomy, args.clients, first.endpoint)
            print(json.dumps({"room": results["room"]}), file=sys.stderr, flush=True)
            tight = inventory_of(state, "three.yaml", profile, [c, d, a])  # c, d run; a alone is free
            results["no_room"] = upgrade(settings, uris[2], tight, args.clients, first.endpoint)
        finally:
            stop_everything(settings)
            time.sleep(3)  # an orted whose mpirun is gone exits ~2 s after its ranks
            results["processes_left_on_hosts_after_stop"] = {h: len(p) for h, p in lan.leftovers().items()}
            shutil.rmtree(state, ignore_errors=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
