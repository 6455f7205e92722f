"""How a Ray Serve replica should route its HTTP requests: its own dispatch, or Serve's ASGI ingress.

nodewise's replica (``serving/app.py``) is a plain deployment whose ``__call__(request)`` matches
(method, path) itself; Serve's alternative is ``@serve.ingress(app)`` with a Starlette or FastAPI
app whose router picks the handler. One run, one local Ray on loopback, one replica of each variant
at a time behind HAProxy (Serve's direct ingress, nodewise's default, with nodewise's Serve switches:
``nodewise.core.runtime.serve_environment``), the same handler in each (read the body, parse it with
orjson, answer ``{"predictions": ...}``), the same ~16 KB body (one 784-float row, as
``serve_throughput.py`` sends), wrk closed-loop at each concurrency:
  dispatch    ``async def __call__(self, request)`` and a match on the path (what nodewise runs)
  starlette   ``@serve.ingress(Starlette(routes=[Route("/invocations", ...)]))``
  fastapi     ``@serve.ingress(FastAPI())`` with ``@app.post("/invocations")`` taking the Request
Measured: requests/s, p50 and p99 per variant and concurrency, and each variant's req/s over
dispatch's. The handler does no model work, so routing and the ASGI layers are what differ.

Usage: .venv/bin/python benchmarks/serve_ingress.py [--seconds 10] [--concurrency 1,8,32] [--only fastapi,...]
(last line: one JSON object)
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from starlette.requests import Request  # at module level: FastAPI resolves the handlers' annotations here

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def variants() -> dict[str, object]:
    """The three deployments, built here so that importing this module starts nothing."""
    import orjson
    from fastapi import FastAPI
    from ray import serve
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    async def score(request: Request) -> Response:
        rows = orjson.loads(await request.body())["inputs"]
        answer = {"predictions": [[0.0] * 10 for _ in rows]}
        return Response(orjson.dumps(answer), media_type="application/json")

    @serve.deployment(max_ongoing_requests=32)
    class Dispatch:
        async def __call__(self, request: Request) -> Response:
            if request.method == "POST" and request.url.path.endswith("/invocations"):
                return await score(request)
            return Response(b'{"message": "no route"}', status_code=404, media_type="application/json")

    @serve.deployment(max_ongoing_requests=32)
    @serve.ingress(Starlette(routes=[Route("/invocations", score, methods=["POST"])]))
    class WithStarlette:
        pass

    api = FastAPI()

    @serve.deployment(max_ongoing_requests=32)
    @serve.ingress(api)
    class WithFastAPI:
        @api.post("/invocations")
        async def invocations(self, request: Request) -> Response:
            return await score(request)

    return {"dispatch": Dispatch, "starlette": WithStarlette, "fastapi": WithFastAPI}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--only", default="", help="comma-separated variants (default: all three)")
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]

    import ray
    from ray import serve

    from benchmarks._load import run_wrk, wait_ready
    from nodewise.core.procs import free_port
    from nodewise.core.runtime import serve_environment
    from nodewise.core.settings import Settings

    body = json.dumps({"inputs": [[0.5] * 784]}).encode()
    temp = Path(tempfile.mkdtemp(prefix="nw-ingress-", dir="/tmp"))
    settings = Settings(state_dir=temp / "state")
    settings.state.haproxy.mkdir(parents=True, exist_ok=True)
    os.environ.update(serve_environment(settings))  # read when Serve is imported, by every process
    port = free_port()
    results: dict[str, dict] = {}
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(temp), logging_level="ERROR")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        wanted = [v for v in args.only.split(",") if v]
        for name, deployment in variants().items():
            if wanted and name not in wanted:
                continue
            serve.run(deployment.bind(), name=name, route_prefix=f"/{name}")
            url = f"http://127.0.0.1:{port}/{name}/invocations"
            wait_ready(url, body, 120)
            run_wrk(url, body, 8, 3)  # warm-up
            results[name] = {f"c{c}": run_wrk(url, body, c, args.seconds) for c in concurrencies}
            serve.delete(name)
            print(json.dumps({name: results[name]}), file=sys.stderr, flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    ratios = {
        name: {c: round(r[c]["rps"] / results["dispatch"][c]["rps"], 3) for c in r}
        for name, r in results.items()
        if name != "dispatch" and "dispatch" in results
    }
    print(json.dumps({"body_bytes": len(body), "servers": results, "rps_over_dispatch": ratios}))


if __name__ == "__main__":
    main()
