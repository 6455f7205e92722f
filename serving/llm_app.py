"""A Ray Serve replica for a causal LM that fits one node: the continuous-batching engine inside.

Concurrent requests to one replica share decoding steps (``serving/engine.py``, on a thread of
the replica); Serve routes across replicas as for any model. Routes, under the app's prefix:
``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``, ``POST /generate``
(``serving/llm_routes.py``, against a ``LocalEngineClient``), and everything ``ModelServer`` answers.
``/invocations`` is parsed as MLflow parses it, and its text prompts go through the engine too
(the prompt and its greedy continuation, as rank 0 answers them); the pyfunc is loaded for its pipeline's weights.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from serving import llm_routes, openai_api
from serving.app import ModelServer, _json, _subpath
from serving.autoscaling import BUDGET_USED, RUNNING, WAITING
from serving.engine import Engine
from serving.engine_client import LocalEngineClient
from serving.metrics import EngineLoad


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
        self.front = llm_routes.LLMFront(
            client=LocalEngineClient(self.engine),
            tokenizer=self.tokenizer,
            limits=self.limits,
            request_timeout_s=self.spec.request_timeout_s,
            max_request_bytes=self.spec.max_request_bytes,
            log_failure=self._log_failure,
            where="the replica log",
            started=self.started,
            on_prompt=self.metrics.on_prompt if self.metrics is not None else None,
        )

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
        handler = llm_routes.ROUTES.get((request.method, path))
        if handler is not None:
            response = await llm_routes.answer(self.front, handler, request)
            self.outcomes.add(ok=response.status_code < 500)
            return response
        return await super()._answer(request)

    async def _predict(self, body: bytes, content_type: str) -> Any:
        """``/invocations`` (and the watchdog's canary): text prompts through the engine, each
        answered with the prompt and its greedy continuation of ``default_new_tokens``, as
        DeepSpeed's rank 0 answers them; parsed as MLflow parses them."""
        assert self.model is not None
        texts = _texts(self.model.parse(body, content_type))
        return await llm_routes.invocation_texts(self.front, texts, self.spec.default_new_tokens)

    def _on_token(self, seq: Any, previous: float | None, now: float) -> None:
        assert self.metrics is not None
        self.metrics.on_token(seq.arrived, previous, now)

    def _load(self) -> EngineLoad:
        engine = self.engine
        return EngineLoad(engine.running, engine.waiting, engine.tokens_in_flight, engine.max_tokens_in_flight)

    async def vitals(self, canary: bytes | None, window_s: float) -> dict[str, Any]:
        report = await super().vitals(canary, window_s)
        return {**report, "engine": {"running": self.engine.running, "waiting": self.engine.waiting}}

    def check_health(self) -> None:
        super().check_health()
        if not self.engine.alive:
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
