"""Fuzz every live nodewise endpoint from its own OpenAPI document, thousands of cases each.

One run on this machine, a fresh state folder: the digits model on Ray Serve (HAProxy ingress),
a tiny Llama on two DeepSpeed ranks under mpirun (rank 0's HTTP), and the webhook receiver
(with signed bodies, so the payload parser is reached). Each endpoint gets schemathesis'
schema-valid and schema-violating requests for every operation (``--examples`` per operation and
mode) plus raw bodies no schema describes (5000-deep nesting, duplicate keys, invalid UTF-8,
numbers outside float32, a Content-Length longer than the body). Reported per endpoint: cases,
statuses, 5xx answers (target 0) and whether the server processes are the same ones after (no
crash, target 0).

Usage: .venv/bin/python benchmarks/fuzz.py [--examples 500] [--no-deepspeed]   (last line: one JSON object)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from testkit import serve_replicas  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=500, help="cases per operation and generation mode")
    parser.add_argument("--no-deepspeed", action="store_true")
    parser.add_argument("--only", choices=["ray_serve", "deepspeed_rank0", "receiver"], help="fuzz one endpoint")
    args = parser.parse_args()

    from benchmarks._instance import local_instance
    from nodewise.core.settings import using_settings

    result: dict[str, Any] = {"benchmark": "fuzz", "examples_per_operation": args.examples, "endpoints": {}}
    triggers = {"webhook_secret": "fuzz-" + uuid.uuid4().hex, "receiver_port": 24416}
    with local_instance("nwz-", 24410, serve={"replicas": 1}, triggers=triggers) as settings:
        from flows.deploy import deploy_model
        from nodewise.demo_models import register_demo_model

        model = register_demo_model(str(settings.state.artifacts))
        with using_settings(settings):
            record = deploy_model(f"models:/{model.name}@champion")
        wanted = [args.only] if args.only else ["ray_serve", "deepspeed_rank0", "receiver"]
        if "ray_serve" in wanted:
            result["endpoints"]["ray_serve"] = fuzz_serve(record.endpoint, args.examples)
        if "deepspeed_rank0" in wanted and not args.no_deepspeed:
            result["endpoints"]["deepspeed_rank0"] = fuzz_rank0(settings, args.examples)
        if "receiver" in wanted:
            result["endpoints"]["receiver"] = fuzz_receiver(settings, args.examples)
    endpoints = result["endpoints"].values()
    result["totals"] = {
        "cases": sum(e["cases"] for e in endpoints),
        "4xx": sum(n for e in endpoints for s, n in e["statuses"].items() if 400 <= int(s) < 500),
        "5xx": sum(len(e["server_errors"]) for e in endpoints),
        "crashes": sum(0 if e["same_processes_after"] else 1 for e in endpoints),
    }
    print(json.dumps(result))


def _timed(fuzz: Any) -> dict[str, Any]:
    started = time.monotonic()
    report = fuzz()
    report["seconds"] = round(time.monotonic() - started, 1)
    report["server_errors"] = report["server_errors"][:20]
    failing = report.pop("failing_requests")
    if failing:  # kept whole, to replay
        path = Path(tempfile.gettempdir()) / f"nodewise-fuzz-failures-{uuid.uuid4().hex[:8]}.json"
        path.write_text(json.dumps(failing, indent=1))
        report["failing_requests_file"] = str(path)
    print(json.dumps(report), file=sys.stderr, flush=True)
    return report


def fuzz_serve(endpoint: str, examples: int) -> dict[str, Any]:
    import httpx

    from testkit.fuzzing import fuzz_endpoint

    def replica_ids() -> list[str]:
        return sorted(r["actor_id"] for r in serve_replicas("nodewise-digits"))

    before = replica_ids()
    report = _timed(lambda: fuzz_endpoint(f"{endpoint}/openapi.json", examples, raw_paths=("/invocations",)))
    report["same_processes_after"] = replica_ids() == before and httpx.get(f"{endpoint}/ping").status_code == 200
    return report


def fuzz_rank0(settings: Any, examples: int) -> dict[str, Any]:
    import httpx

    from testkit.fuzzing import fuzz_endpoint
    from testkit.lm import deploy_on_two_ranks, rank_pids, register_tiny_llama

    record: Any = deploy_on_two_ranks(settings, register_tiny_llama(settings, "fuzz"))
    before = rank_pids(record.endpoint)
    raw = ("/invocations", "/generate")
    report = _timed(lambda: fuzz_endpoint(f"{record.endpoint}/openapi.json", examples, raw_paths=raw))
    if report["server_errors"]:  # what rank 0 logged for them (its request ids), for the record
        from tasks.mpi.health import app_log

        failed = [line for line in (app_log(settings, record.app_name, 400) or "").splitlines() if "failed:" in line]
        report["rank0_log"] = failed[-10:]
    alive = httpx.get(f"{record.endpoint}/ping", timeout=10).status_code == 200
    report["same_processes_after"] = alive and rank_pids(record.endpoint) == before
    return report


def fuzz_receiver(settings: Any, examples: int) -> dict[str, Any]:
    """The receiver with an unreachable Prefect API: a valid promotion gets 502 (MLflow retries);
    the registry knows the demo model."""
    import logging
    import threading

    import httpx

    from tasks.triggers.promotion import sign
    from tasks.triggers.webhook_server import Receiver, registry_lookup, serve
    from testkit.fuzzing import fuzz_endpoint

    logging.getLogger("nodewise.receiver").setLevel(logging.CRITICAL)
    secret = settings.triggers.webhook_secret.get_secret_value()
    port = settings.triggers.receiver_port
    server = serve(Receiver(settings, "http://127.0.0.1:9/api", registry_lookup(settings)), "127.0.0.1", port)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def signed(body: bytes) -> dict[str, str]:
        delivery, stamp = str(uuid.uuid4()), str(int(time.time()))
        signature = sign(secret, delivery, stamp, body)
        return {"X-MLflow-Delivery-Id": delivery, "X-MLflow-Timestamp": stamp, "X-MLflow-Signature": signature}

    base = f"http://127.0.0.1:{port}"
    try:
        report = _timed(lambda: fuzz_endpoint(f"{base}/openapi.json", examples, sign=signed, raw_paths=("/webhook",)))
        report["same_processes_after"] = httpx.get(f"{base}/health", timeout=10).status_code == 200
        # 502 is the receiver's planned answer when Prefect does not take the event (MLflow redelivers)
        report["server_errors"] = [e for e in report["server_errors"] if "-> 502 " not in e]
    finally:
        server.shutdown()
        server.server_close()
    return report


if __name__ == "__main__":
    main()
