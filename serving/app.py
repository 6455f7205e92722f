"""The Ray Serve application: an MLflow-compatible scoring endpoint for one model.

Routes, under the application's route prefix (one prefix per model):
``POST /invocations``, ``GET /ping``, ``GET /health``, ``GET /version``.
Errors map to statuses in one place (``serving/errors.py``): bad input 400, body too large 413,
unsupported content type 415, unknown route 404, model not ready 503, anything else 500 with a
request id in the log.

Each replica also answers the watchdog, which calls it directly (not through the router):
``vitals`` runs a canary inference and reports the replica's memory and its recent error rate.
Whether that makes the replica sick is the watchdog's call (tasks/rayserve/watch.py), within its
restart budget; ``check_health`` only says whether the model is loaded.

A rollout (a challenger beside this model, Serve's ``user_config``) is the replica's
``ReplicaRollout``'s (``serving/rollout_replica.py``), which ``ModelServer`` holds and hands
Serve's rollout calls.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import Any

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from serving._http import json_response as _json
from serving._http import subpath as _subpath
from serving._model import LoadedModel
from serving._protocol import encode_predictions
from serving.autoscaling import IN_FLIGHT
from serving.autoscaling import POLICY as AUTOSCALING_POLICY
from serving.errors import NotFound, NotReady, PayloadTooLarge, encode_json, error_response
from serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from serving.metrics import ServingMetrics, serve_metrics
from serving.openapi import document, scoring_paths
from serving.rollout import RolloutConfig
from serving.rollout_replica import ReplicaRollout
from serving.spec import ModelServeSpec

logger = logging.getLogger("ray.serve")

_JSON = "application/json"


class ModelServer:
    """One replica: loads the model once, then answers scoring requests (and its part in a rollout:
    ``ReplicaRollout``, serving/rollout_replica.py)."""

    metrics: ServingMetrics | None = None
    metrics_address: str | None = None  # this replica's own /metrics (its scrape target)
    llm: Any = None  # a causal LM's engine and routes (serving/llm_app.py's LLMReplica), else None

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = ModelServeSpec.model_validate(spec)
        self.model: LoadedModel | None = None
        self.outcomes = Outcomes()
        self.rollouts = ReplicaRollout(self.spec, self.outcomes, self._predict, self._log_failure)
        self._stop_metrics: Any = None
        self._batch_started = 0  # requests whose batch began, not yet back in ``_predict``
        self.in_flight = 0  # requests in this replica (a stream counts until its response is returned)
        self.model = LoadedModel.load(self.spec)
        self._predict_batch.set_max_batch_size(self.spec.max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(self.spec.batch_wait_timeout_s)
        if self.spec.metrics:
            self.metrics = ServingMetrics(
                self.spec.model_name, self.spec.model_version, "ray_serve", self.spec.latency_target_s
            )
            try:
                self.metrics_address, self._stop_metrics = serve_metrics(
                    self.metrics, _node_address(), self.spec.metrics_port
                )
            except OSError as e:  # the pod's fixed port is another replica's: this one takes any
                logger.warning("metrics port %s: %s; using an ephemeral port", self.spec.metrics_port, e)
                self.metrics_address, self._stop_metrics = serve_metrics(self.metrics, _node_address())
        if self.spec.engine:  # a causal LM: the batching engine and the LLM routes in this replica
            from serving.llm_app import LLMReplica

            self.llm = LLMReplica(self.spec, self.model, self.metrics, self.outcomes, self._log_failure)

    async def __call__(self, request: Request) -> Response:
        self.in_flight += 1  # what the autoscaling policy reads (record_autoscaling_stats)
        try:
            return await self._measured(request)
        finally:
            self.in_flight -= 1

    def record_autoscaling_stats(self) -> dict[str, float]:
        """This replica's load for nodewise's autoscaling policy (Serve samples it; serving/autoscaling.py)."""
        stats = {IN_FLIGHT: float(self.in_flight)}
        if self.llm is not None:  # an LLM replica scales on its engine's load too
            stats.update(self.llm.autoscaling_stats())
        return stats

    async def _measured(self, request: Request) -> Response:
        metrics = self.metrics
        if metrics is None:
            return await self._answer(request)
        started = time.perf_counter()
        metrics.in_flight.inc()
        status, streamed = 500, False
        try:
            response = await self._answer(request)
            status = response.status_code
            if isinstance(response, StreamingResponse):  # counted when the stream ends
                response.body_iterator = metrics.astreamed(_subpath(request), started, response.body_iterator)
                streamed = True
            return response
        finally:
            if not streamed:
                metrics.in_flight.dec()
                metrics.observe(_subpath(request), status, time.perf_counter() - started)

    async def _answer(self, request: Request) -> Response:
        path = _subpath(request)
        if self.llm is not None and (answer := await self.llm.answer(request, path)) is not None:
            return answer
        try:
            if path == "/metrics" and request.method == "GET" and self.metrics is not None:
                return Response(self.metrics.exposition(), media_type=METRICS_CONTENT_TYPE)
            if path in ("/ping", "/health") and request.method == "GET":
                return self._ping()
            if path == "/openapi.json" and request.method == "GET":
                title = f"nodewise: {self.spec.model_name} on Ray Serve"
                paths = scoring_paths()
                return _json(200, document(title, self.spec.model_version, paths, request.scope.get("root_path", "")))
            if path == "/version" and request.method == "GET":
                return _json(200, {"model": self.spec.model_name, "version": self.spec.model_version})
            if path == "/invocations" and request.method == "POST":
                response = await self._invocations(request)
                self.outcomes.add(ok=True)
                return response
            routes = "POST /invocations, GET /ping, /health, /version, /metrics or /openapi.json"
            raise NotFound(f"no route {request.method} {path}; use {routes}")
        except Exception as e:  # one place maps every error to a status (serving/errors.py)
            return self._error_response(e)

    def _ping(self) -> Response:
        if self.model is None:
            raise NotReady("model is not loaded")
        return Response(b"\n", status_code=200, media_type=_JSON)

    async def _invocations(self, request: Request) -> Response:
        body = await request.body()
        if len(body) > self.spec.max_request_bytes:
            raise PayloadTooLarge(
                f"body is {len(body)} bytes; the limit is {self.spec.max_request_bytes} "
                "(max_request_bytes): send fewer rows per request"
            )
        content_type = request.headers.get("content-type", _JSON)
        if (answer := await self.rollouts.invocations(body, content_type)) is not None:
            return answer
        predictions = await self._predict(body, content_type)
        return Response(encode_predictions(predictions), media_type=_JSON, headers=self.rollouts.version_header)

    # -- a rollout (serving/rollout_replica.py): Serve calls these on the replica -------------
    def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve's ``user_config``: ``{"rollout": RolloutConfig or None}``."""
        self.rollouts.reconfigure(config)

    def rollout_stats(self) -> dict[str, Any] | None:
        """For the decision flow, which calls every replica directly."""
        return self.rollouts.rollout_stats()

    async def score(self, body: bytes, content_type: str) -> dict[str, Any]:
        """A champion's call to this challenger (``ReplicaRollout.score``)."""
        return await self.rollouts.score(body, content_type)

    async def score_many(self, requests: list[tuple[bytes, str]]) -> list[dict[str, Any]]:
        return await self.rollouts.score_many(requests)

    async def _predict(self, body: bytes, content_type: str) -> Any:
        assert self.model is not None
        if self.llm is not None:  # text prompts through the engine
            return await self.llm.predict(body, content_type)
        inputs = self.model.parse(body, content_type)
        if self.model.batches and len(inputs) > 0:
            if self.metrics is None:
                return await self._predict_batch(inputs)
            self.metrics.queued.inc()  # until its batch starts (``_predict_batch`` takes it off)
            try:
                return await self._predict_batch(inputs)
            finally:
                self._unqueue()
        return self.model.predict(inputs)

    def _unqueue(self) -> None:
        """A request waiting for its batch left the queue: its batch began, or it was cancelled."""
        if self._batch_started > 0:
            self._batch_started -= 1
        elif self.metrics is not None:
            self.metrics.queued.dec()

    async def vitals(self, canary: bytes | None, window_s: float) -> dict[str, Any]:
        """For the watchdog: one canary inference (not counted as traffic), memory, recent errors."""
        started = time.perf_counter()
        canary_error = None
        if canary is not None:
            try:
                encode_predictions(await self._predict(canary, _JSON))
            except Exception as e:  # the canary's failure is a finding, not this call's
                canary_error = f"{type(e).__name__}: {e}"[:300]
        requests, errors = self.outcomes.window(window_s)
        return {
            "pid": os.getpid(),
            "rss_bytes": resident_bytes(),
            "memory_limit_bytes": self.spec.memory_limit_bytes,
            "requests": requests,
            "errors": errors,
            "window_s": window_s,
            "canary_s": round(time.perf_counter() - started, 4),
            "canary_error": canary_error,
            "metrics_address": self.metrics_address,
            **({"engine": self.llm.batch()} if self.llm is not None else {}),
        }

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)  # both set from the spec in __init__
    async def _predict_batch(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        assert self.model is not None
        if self.metrics is not None:  # these requests wait no more
            self.metrics.queued.dec(len(arrays))
            self._batch_started += len(arrays)
        sizes = [a.shape[0] for a in arrays]
        out = self.model.predict_tensor(arrays[0] if len(arrays) == 1 else np.concatenate(arrays))
        return np.split(out, np.cumsum(sizes)[:-1])

    def _error_response(self, error: Exception) -> Response:
        status, body = error_response(error, self._log_failure, where="the replica log")
        return Response(body, status_code=status, media_type=_JSON)

    def _log_failure(self, request_id: str, error: Exception) -> None:
        self.outcomes.add(ok=False)  # a 500 is the replica's failure; a client's 4xx is not
        logger.error("request %s failed", request_id, exc_info=error)

    def check_health(self) -> None:
        """Called by Ray Serve; raising makes Serve restart this replica alone."""
        if self.model is None:
            raise RuntimeError("model is not loaded")
        if self.llm is not None:
            self.llm.check_health()

    def metrics_target(self) -> dict[str, str] | None:
        """This replica's own ``/metrics`` (``host:port``) and its labels, for the scrape targets
        (tasks/metrics/targets.py), or None where metrics are off."""
        if self.metrics_address is None:
            return None
        return {"address": self.metrics_address, "model": self.spec.model_name, "version": self.spec.model_version}

    def __del__(self) -> None:
        if self.llm is not None:
            self.llm.stop()
        stop = getattr(self, "_stop_metrics", None)
        if stop is not None:
            self._stop_metrics = None
            stop()


class Outcomes:
    """Requests answered and failed (500s: a client's 4xx is not the replica's failure), in
    one-second buckets over the last ``keep_s`` seconds."""

    def __init__(self, keep_s: int = 600) -> None:
        self.keep_s = keep_s
        self._buckets: dict[int, list[int]] = {}

    def add(self, ok: bool, now: float | None = None) -> None:
        second = int(time.monotonic() if now is None else now)
        bucket = self._buckets.get(second)
        if bucket is None:
            bucket = self._buckets[second] = [0, 0]
            if len(self._buckets) > self.keep_s:
                for old in [s for s in self._buckets if s <= second - self.keep_s]:
                    del self._buckets[old]
        bucket[0] += 1
        bucket[1] += not ok

    def window(self, seconds: float, now: float | None = None) -> tuple[int, int]:
        """(requests, errors) over the last ``seconds``."""
        since = (time.monotonic() if now is None else now) - seconds
        picked = [b for s, b in self._buckets.items() if s >= since]
        return sum(b[0] for b in picked), sum(b[1] for b in picked)


def resident_bytes() -> int:
    """This process's resident memory (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _node_address() -> str:
    """The address this replica's node is reached at (Ray's own view of it; loopback outside Ray)."""
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # not in a Ray worker (a test building the class directly)
        return "127.0.0.1"


def build_app(
    spec: ModelServeSpec,
    runtime_env: dict[str, Any] | None = None,
    rollout: RolloutConfig | None = None,
    versioned: bool = False,
) -> Any:
    """Build the Serve application for ``spec`` (not yet running); ``rollout``: a challenger beside it.

    ``versioned``: the deployment's version is the hash of what its replicas start from (the spec
    and the runtime environment), so that deployed again with the same spec and another
    ``rollout``, Serve only reconfigures the running replicas, and another spec rolls them. Ray
    Serve 2.60 removed ``version`` from ``options()`` (``serve.run`` draws a random one, restarting
    every replica on each deploy), so it is set on the deployment object, the field ``serve.run``
    reads; a config file's app (``from_config``) gets its version from Serve.
    """
    payload = spec.model_dump(mode="json")
    options: dict[str, Any] = {
        "name": "ModelServer",
        "user_config": {"rollout": None if rollout is None else rollout.model_dump(mode="json")},
        "ray_actor_options": {
            "num_cpus": spec.num_cpus,
            # A multi-device replica's actor holds the first device of its bundles.
            "num_gpus": min(spec.num_gpus, 1.0) if spec.tp_size > 1 else spec.num_gpus,
            **({"runtime_env": runtime_env} if runtime_env else {}),
        },
        "max_ongoing_requests": spec.max_ongoing_requests,
        "health_check_period_s": 5,
        "health_check_timeout_s": 30,
        "max_constructor_retry_count": spec.max_start_attempts,
    }
    if spec.max_replicas > spec.min_replicas:
        options["autoscaling_config"] = {
            "min_replicas": spec.min_replicas,
            # a model that scales to zero starts with one replica: the deploy proves it loads
            "initial_replicas": max(1, spec.min_replicas),
            "max_replicas": spec.max_replicas,
            "target_ongoing_requests": spec.target_ongoing_requests,
            "upscale_delay_s": spec.upscale_delay_s,
            "downscale_delay_s": spec.downscale_delay_s,
            "look_back_period_s": spec.look_back_period_s,
            # How often a replica pushes its samples. Ray 2.60 reads only this (deprecated) field: the
            # RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S it names instead is read nowhere, so
            # replicas pushed every 10 s whatever that variable said.
            "metrics_interval_s": spec.metrics_push_interval_s,
            # nodewise's rule (serving/autoscaling.py): a step seen at once; LLM replicas on their engine
            "policy": {"policy_function": AUTOSCALING_POLICY},
        }
    else:
        options["num_replicas"] = spec.min_replicas
    if spec.tp_size > 1:
        # One replica spans tp_size devices of one node: reserve them together.
        per_device = {"GPU": 1.0} if spec.num_gpus else {"CPU": 1.0}
        options["placement_group_bundles"] = [{"CPU": spec.num_cpus, **per_device}] + [per_device] * (spec.tp_size - 1)
        options["placement_group_strategy"] = "STRICT_PACK"
    deployment = serve.deployment(ModelServer).options(**options)
    if versioned:
        deployment._version = hashlib.sha256(encode_json({"spec": payload, "env": runtime_env})).hexdigest()[:16]
    return deployment.bind(payload)


def from_config(args: dict[str, Any]) -> Any:
    """Serve's application builder for a config file (``import_path: serving.app:from_config``,
    ``args: {spec: ...}``): what a KubeRay RayService's serveConfigV2 names."""
    return build_app(ModelServeSpec.model_validate(args["spec"]))
