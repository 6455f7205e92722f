"""Rank 0's HTTP app: Starlette on uvicorn (``serving/http_server.py``), its own thread beside the step loop.

The LLM routes (``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``, and ``/generate``
when the batching engine runs) are ``serving/llm_routes.py``'s, the Ray Serve replica's too,
against a ``BroadcastEngineClient``: each prompt is an ``Add`` the step loop broadcasts to every
rank; the sequence's events come back from the step loop's thread to this event loop with
``loop.call_soon_threadsafe``. ``/invocations`` and ``/generate`` without the engine are checked by
rank 0's ``Frontend`` and their work awaited on this loop (``Frontend.run``: the step loop's
future, wrapped; no worker thread), text ``/invocations`` go through the engine's route when it
runs. ``/ping``, ``/health``, ``/version``, ``/openapi.json``, ``/metrics`` and the ranks'
heartbeats are answered here. Every route is counted in the metrics; every
error is mapped to its status in one place (``serving/errors.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from serving import llm_routes, openai_api
from serving._protocol import encode_predictions
from serving.engine_client import LoopEvents
from serving.errors import BadRequest, NotFound, decode_json, encode_json, error_response, receive_body
from serving.messages import EndEvent, Event, Forward
from serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from serving.metrics import UNCOUNTED, EngineLoad

WHERE = "rank 0's log (nodewise logs APP)"
_JSON = "application/json"
_BODY_TIMEOUT_S = 30  # seconds a client may pause while sending a request (then 408)
# Above this, an /invocations body is parsed on a worker thread so the event loop keeps answering
# (/ping, streamed tokens) meanwhile; below it the thread hop costs more than the parse.
_PARSE_ON_A_THREAD_BYTES = 256 * 1024


class BroadcastEngineClient:
    """The engine every rank runs in step, driven from rank 0 (``Frontend``'s step loop commands)."""

    def __init__(self, frontend: Any) -> None:
        self.frontend = frontend

    @property
    def max_tokens_in_flight(self) -> int:
        return int(self.frontend.model.tokens_in_flight)

    async def generate(self, prompt: Sequence[int], params: Any, request_id: str) -> AsyncIterator[Event]:
        events = LoopEvents(asyncio.get_running_loop())
        sampling = {k: v for k, v in dataclasses.asdict(params).items() if k != "max_tokens"}
        self.frontend.add(np.asarray(prompt), params.max_tokens, sampling, events, request_id=request_id)
        ended = False
        try:
            while not ended:
                event = await events.queue.get()
                ended = isinstance(event, EndEvent)
                yield event
        finally:
            if not ended:
                self.frontend.cancel(request_id)

    def cancel(self, request_id: str) -> None:
        self.frontend.cancel(request_id)

    def check_ready(self) -> None:
        self.frontend.check_ready()

    def load(self) -> EngineLoad:
        return self.frontend._load()


def _log_failure(request_id: str, error: Exception) -> None:
    print(f"request {request_id} failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)


class Rank0App:
    """The ASGI app rank 0 serves: one dispatch on (method, path), as the Ray Serve replica's."""

    def __init__(self, frontend: Any) -> None:
        self.frontend = frontend
        self.spec = frontend.spec
        self._front: llm_routes.LLMFront | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        path = request.url.path
        metrics = self.frontend.metrics
        if metrics is None or path in UNCOUNTED:
            await (await self._answer(request, path))(scope, receive, send)
            return
        started = time.perf_counter()
        metrics.in_flight.inc()
        status = 500
        try:
            response = await self._answer(request, path)
            status = response.status_code
            await response(scope, receive, send)
        finally:
            metrics.in_flight.dec()
            metrics.observe(path, status, time.perf_counter() - started)

    async def _answer(self, request: Request, path: str) -> Response:
        try:
            return await self._route(request, request.method, path)
        except Exception as e:  # one place maps every error to a status
            status, body = error_response(e, _log_failure, where=WHERE)
            return Response(body, status_code=status, media_type=_JSON)

    async def _route(self, request: Request, method: str, path: str) -> Response:
        frontend = self.frontend
        if method == "GET":
            return self._get(path)
        if method != "POST":
            raise self._not_found(method, path)
        if path in ("/v1/completions", "/v1/chat/completions"):
            try:
                front = self._llm_front()
            except Exception as e:  # OpenAI's error shape on its routes
                status, body = openai_api.openai_error(e, _log_failure, where=WHERE)
                return Response(body, status_code=status, media_type=_JSON)
            return await llm_routes.ROUTES[("POST", path)](front, request)
        if path == "/generate" and self._batching:
            return await llm_routes.generate(self._llm_front(), request)
        body = await receive_body(request, self.spec.max_request_bytes, _BODY_TIMEOUT_S)
        if path == "/invocations":
            return await self._invocations(body, request.headers.get("content-type", ""))
        if path == "/generate":  # without the engine: whole requests, greedy, one a step
            parsed = frontend.generation(body)
            outputs, compute_ms = await frontend.run(frontend.generate_work(parsed))
            if parsed.texts is None:
                return _timed({"output_ids": outputs}, compute_ms)
            texts = [t + frontend.decode(o) for t, o in zip(parsed.texts, outputs, strict=True)]
            return _timed({"generated_text": texts}, compute_ms)
        if path == "/internal/heartbeat":
            value = decode_json(body)
            if not isinstance(value, dict):
                raise BadRequest("body must be a JSON object")
            frontend.view.record(value)
            return Response(b"{}", media_type=_JSON)
        raise self._not_found(method, path)

    def _get(self, path: str) -> Response:
        frontend, spec = self.frontend, self.spec
        if path == "/metrics" and frontend.metrics is not None:
            return Response(frontend.metrics.exposition(), media_type=METRICS_CONTENT_TYPE)
        if path in ("/ping", "/health"):
            health = frontend.view.health()
            if frontend.model is None and health["ready"]:
                health = {**health, "ready": False, "problems": ["rank 0: loading"]}
            body = health if path == "/health" else {"ready": health["ready"], "problems": health["problems"]}
            return Response(encode_json(body), status_code=200 if health["ready"] else 503, media_type=_JSON)
        if path == "/openapi.json":
            from serving.openapi import document, scoring_paths

            title = f"nodewise: {spec.model_name} on {spec.tp_size} DeepSpeed ranks"
            return _json(document(title, spec.model_version, scoring_paths(generate=True)))
        if path == "/v1/models":
            created = int(time.time() - (time.monotonic() - frontend.view.started))
            positions = frontend.model.max_positions if frontend.model is not None else None
            return _json(openai_api.models(spec.model_name, created, positions))
        if path == "/version":
            info = {"model": spec.model_name, "version": spec.model_version, "backend": "deepspeed_mpi"}
            return _json({**info, "tp_size": spec.tp_size})
        raise self._not_found("GET", path)

    async def _invocations(self, body: bytes, content_type: str) -> Response:
        """Token ids: one forward pass on every rank. Text prompts: each prompt and its greedy
        continuation, through the engine's route (``llm_routes.invocation_texts``) when it runs."""
        frontend = self.frontend
        if len(body) > _PARSE_ON_A_THREAD_BYTES:  # a large body is parsed off the event loop
            work = await asyncio.to_thread(frontend.invocation, body, content_type)
        else:
            work = frontend.invocation(body, content_type)
        if isinstance(work, Forward):
            logits, compute_ms = await frontend.run(work)
            return _timed(encode_predictions(logits), compute_ms)
        if self._batching:
            started = time.perf_counter()
            texts = await llm_routes.invocation_texts(self._llm_front(), work, self.spec.default_new_tokens)
            return _timed(encode_predictions(texts), (time.perf_counter() - started) * 1000)
        outputs, compute_ms = await frontend.run(frontend.text_work(work))
        texts = [t + frontend.decode(o) for t, o in zip(work, outputs, strict=True)]
        return _timed(encode_predictions(texts), compute_ms)

    @property
    def _batching(self) -> bool:
        return self.frontend.batching

    def _llm_front(self) -> llm_routes.LLMFront:
        """The LLM routes' view of rank 0, once the model is loaded and runs the batching engine."""
        self.frontend.check_ready()
        if not self._batching:
            raise BadRequest(
                "the OpenAI routes need a generating model and the batching engine "
                "(NODEWISE_DEEPSPEED__BATCHING=true); use POST /invocations"
            )
        if self._front is None:
            model, spec = self.frontend.model, self.spec
            self._front = llm_routes.LLMFront(
                client=BroadcastEngineClient(self.frontend),
                tokenizer=model.tokenizer,
                limits=self.frontend.limits,
                request_timeout_s=spec.request_timeout_s,
                max_request_bytes=spec.max_request_bytes,
                log_failure=_log_failure,
                where=WHERE,
                started=int(time.time() - (time.monotonic() - self.frontend.view.started)),
            )
        return self._front

    @staticmethod
    def _not_found(method: str, path: str) -> NotFound:
        return NotFound(
            f"no route {method} {path}; use POST /invocations, POST /generate, "
            "POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /metrics or GET /ping"
        )


def _json(payload: dict[str, Any]) -> Response:
    return Response(encode_json(payload), media_type=_JSON)


def _timed(answer: dict[str, Any] | bytes, compute_ms: float) -> Response:
    """An answer with the ranks' compute time for it as ``Server-Timing``."""
    body = answer if isinstance(answer, bytes) else encode_json(answer)
    return Response(body, media_type=_JSON, headers={"Server-Timing": f"compute;dur={compute_ms:.2f}"})
