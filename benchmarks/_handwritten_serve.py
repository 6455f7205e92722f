"""The peer a user would write by hand: a minimal Ray Serve app with @serve.batch.

Started by serve_throughput.py as ``python benchmarks/_handwritten_serve.py MODEL_URI PORT TEMP_DIR``.
It starts its own local Ray (default settings, as a user's `ray.init()` would), serves the MLflow
model with 2 replicas x 0.5 CPU, max_ongoing_requests=32, @serve.batch(32, 5 ms), and stops
everything on SIGTERM.
"""

from __future__ import annotations

import signal
import sys
import threading

import mlflow
import numpy as np
import ray
import torch
from ray import serve
from starlette.requests import Request


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=32)
class Handwritten:
    def __init__(self, uri: str) -> None:
        self.model = mlflow.pytorch.load_model(uri).eval()

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def predict(self, rows: list[np.ndarray]) -> list[list]:
        with torch.inference_mode():
            out = self.model(torch.as_tensor(np.concatenate(rows))).numpy()
        return np.split(out, np.cumsum([len(r) for r in rows])[:-1])

    async def __call__(self, request: Request) -> dict:
        body = await request.json()
        rows = np.asarray(body["inputs"], dtype=np.float32)
        return {"predictions": (await self.predict(rows)).tolist()}


def main(uri: str, port: int, temp_dir: str) -> None:
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, logging_level="ERROR")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(Handwritten.bind(uri), route_prefix="/", name="handwritten")
    print("ready", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
