"""A Ray Serve replica for a causal LM that fits one node: the continuous-batching engine inside.

Concurrent requests to one replica share decoding steps (``serving/engine.py``, on a thread of
the replica); Serve routes across replicas as for any model. Routes, under the app's prefix:
``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models`` (``serving/openai_api.py``,
the same code as DeepSpeed's rank 0), and everything ``ModelServer`` answers. ``/invocations`` is
parsed as MLflow parses it, and its text prompts go through the engine too (the prompt and its
greedy continuation, as rank 0 answers them); the pyfunc is loaded for its pipeline's weights.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from serving import openai_api
from serving.app import ModelServer, _json, _subpath
from serving.autoscaling import BUDGET_USED, RUNNING, WAITING
from serving.engine import Engine, SamplingParams
from serving.messages import FinishReason
from serving.metrics import EngineLoad

_ROUTES = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}
_END = object()


class LLMServer(ModelServer):
    """One replica of a transformers text-generation model, batching within itself."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import torch

        super().__init__(spec)
        torch.set_num_threads(self.spec.torch_threads)
        assert self.model is not None
        pipeline = self.model.pipeline()
        self.module, self.tokenizer = pipeline.model, pipeline.tokenizer
        config = getattr(self.module, "config", None)
        self.max_positions: int | None = getattr(config, "max_position_embeddings", None)
        budget = self.spec.max_tokens_in_flight or self.spec.max_batch_size * (self.max_positions or 2048)
        self.engine = Engine.for_model(
            self.module,
            self.tokenizer,
            max_tokens_in_flight=budget,
            max_batch=self.spec.max_batch_size,
            device=self.spec.device,
        )
        if self.metrics is not None:
            self.metrics.add_engine(self._load)
            self.engine.on_token = self._on_token
        self.engine.start()
        self.started = int(time.time())
        self.limits = openai_api.Limits.of(self.spec, self.module, budget)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The engine's load: an LLM replica scales on waiting sequences and its token budget."""
        engine = self.engine
        return {
            **super().record_autoscaling_stats(),
            WAITING: float(engine.blocked),  # waiting that the batch has no room for, not for the next step
            RUNNING: float(engine.running),
            BUDGET_USED: engine.tokens_in_flight / engine.max_tokens_in_flight,
        }

    async def _answer(self, request: Request) -> Response:
        path = _subpath(request)
        if path == "/health" and request.method == "GET":  # this replica's batch, for a person or a test
            engine = self.engine
            batch = {"running": engine.running, "waiting": engine.waiting, "blocked": engine.blocked, **engine.finished}
            return _json(200, {"ready": True, "engine": batch, "tokens_in_flight": engine.max_tokens_in_flight})
        if path == "/openapi.json" and request.method == "GET":
            from serving.openapi import document, openai_paths, scoring_paths

            title = f"nodewise: {self.spec.model_name} on Ray Serve (batching engine)"
            paths = {**scoring_paths(), **openai_paths()}
            return _json(200, document(title, self.spec.model_version, paths, request.scope.get("root_path", "")))
        if path == "/v1/models" and request.method == "GET":
            return _json(200, openai_api.models(self.spec.model_name, self.started, self.max_positions))
        if path in _ROUTES and request.method == "POST":
            try:
                response = await self._openai(_ROUTES[path], request)
            except Exception as e:  # OpenAI's error shape on its routes
                status, body = openai_api.openai_error(e, self._log_failure, where="the replica log")
                return Response(body, status_code=status, media_type="application/json")
            self.outcomes.add(ok=True)
            return response
        return await super()._answer(request)

    async def _openai(self, kind: Any, request: Request) -> Response:
        from serving.errors import PayloadTooLarge, decode_json

        body = await request.body()
        if len(body) > self.spec.max_request_bytes:
            raise PayloadTooLarge(f"body is {len(body)} bytes; the limit is {self.spec.max_request_bytes}")
        parsed = openai_api.parse_request(kind, decode_json(body), self.limits, self.tokenizer)
        params = SamplingParams(max_tokens=parsed.max_tokens, **parsed.sampling)
        sequences = self._add(parsed.prompts, params)
        timeout = self.spec.request_timeout_s
        decode = self._decode
        if parsed.stream:
            [seq] = sequences
            chunks = openai_api.stream(parsed, openai_api.events_of(seq.events, timeout, seq.cancel), decode)
            return StreamingResponse(_async(chunks, seq.cancel), media_type="text/event-stream")
        answers = await self._answers(sequences)
        return _json(200, openai_api.response(parsed, answers, decode))

    async def _predict(self, body: bytes, content_type: str) -> Any:
        """``/invocations`` (and the watchdog's canary): text prompts through the engine, each
        answered with the prompt and its greedy continuation of ``default_new_tokens``, as
        DeepSpeed's rank 0 answers them; parsed as MLflow parses them, checked as the OpenAI
        routes check a prompt."""
        assert self.model is not None
        texts = _texts(self.model.parse(body, content_type))
        payload = {"prompt": texts, "max_tokens": self.spec.default_new_tokens}
        parsed = openai_api.parse_request("completion", payload, self.limits, self.tokenizer)
        params = SamplingParams(max_tokens=parsed.max_tokens)
        answers = await self._answers(self._add(parsed.prompts, params))
        return [text + self._decode(tokens) for text, (tokens, _) in zip(texts, answers, strict=True)]

    async def _answers(self, sequences: list[Any]) -> list[tuple[list[int], FinishReason]]:
        """Each sequence's tokens and finish reason, waited for off the event loop; a timeout, or the
        client gone (the request cancelled), frees every slot."""
        timeout = self.spec.request_timeout_s

        def results() -> list[tuple[list[int], FinishReason]]:
            return [openai_api.collect(openai_api.events_of(s.events, timeout, s.cancel)) for s in sequences]

        try:
            return await asyncio.to_thread(results)
        except BaseException:
            for seq in sequences:
                seq.cancel()
            raise

    def _add(self, prompts: list[list[int]], params: SamplingParams) -> list[Any]:
        sequences = [self.engine.add(prompt, params) for prompt in prompts]
        if self.metrics is not None:
            self.metrics.on_prompt(sum(len(p) for p in prompts))
        return sequences

    def _on_token(self, seq: Any, previous: float | None, now: float) -> None:
        assert self.metrics is not None
        self.metrics.on_token(seq.arrived, previous, now)

    def _load(self) -> EngineLoad:
        engine = self.engine
        return EngineLoad(engine.running, engine.waiting, engine.tokens_in_flight, engine.max_tokens_in_flight)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    async def vitals(self, canary: bytes | None, window_s: float) -> dict[str, Any]:
        report = await super().vitals(canary, window_s)
        return {**report, "engine": {"running": self.engine.running, "waiting": self.engine.waiting}}

    def check_health(self) -> None:
        super().check_health()
        thread = self.engine._thread
        if thread is None or not thread.is_alive():
            raise RuntimeError("the generation engine's thread is not running")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()
        super().__del__()


def _texts(data: Any) -> list[str]:
    """The prompts of a parsed scoring request: one string, a list of them, or a one-column table."""
    from serving.errors import BadRequest

    if hasattr(data, "to_numpy"):  # a DataFrame (dataframe_split, dataframe_records, CSV)
        if getattr(data, "shape", (0, 0))[1] != 1:
            raise BadRequest("this model takes one column of text prompts")
        data = data.iloc[:, 0].tolist()
    if isinstance(data, dict) and len(data) == 1:
        data = next(iter(data.values()))
    if isinstance(data, str):
        data = [data]
    if hasattr(data, "tolist"):
        data = data.tolist()
    if not isinstance(data, list) or not data or not all(isinstance(t, str) for t in data):
        raise BadRequest('this model takes text prompts: send {"inputs": ["a prompt", ...]}')
    return data


async def _async(chunks: Iterator[bytes], on_close: Any) -> AsyncIterator[bytes]:
    """The SSE chunks without blocking the replica's event loop; a client gone (Serve cancels the
    request) or a finished stream frees the sequence's slot."""
    try:
        while True:
            chunk = await asyncio.to_thread(next, chunks, _END)
            if chunk is _END:
                return
            yield chunk  # type: ignore[misc]
    finally:
        on_close()
