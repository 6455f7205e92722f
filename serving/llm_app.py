"""A Ray Serve replica for a causal LM that fits one node: the continuous-batching engine inside.

Concurrent requests to one replica share decoding steps (``serving/engine.py``, on a thread of
the replica); Serve routes across replicas as for any model. Routes, under the app's prefix:
``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``, ``POST /generate``
(``serving/llm_routes.py``, against a ``LocalEngineClient``), and everything ``ModelServer`` answers.
``/invocations`` is parsed as MLflow parses it, and its text prompts go through the engine too
(the prompt and its greedy continuation, as rank 0 answers them); the pyfunc is loaded for its pipeline's weights.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from serving import llm_routes, openai_api
from serving._http import json_response
from serving.autoscaling import BUDGET_USED, RUNNING, WAITING
from serving.engine import Engine
from serving.engine_client import LocalEngineClient


class LLMReplica:
    """The LLM part of a Serve replica (``ModelServer`` holds one when its spec has the engine):
    the batching engine on a thread of the replica, behind a ``LocalEngineClient``, and the LLM
    routes of ``serving/llm_routes.py``."""

    def __init__(self, spec: Any, model: Any, metrics: Any, outcomes: Any, log_failure: Any) -> None:
        import torch

        torch.set_num_threads(spec.torch_threads)
        self.spec, self.metrics, self.outcomes = spec, metrics, outcomes
        pipeline = model.pipeline()
        self.module, self.tokenizer = pipeline.model, pipeline.tokenizer
        config = getattr(self.module, "config", None)
        self.max_positions: int | None = getattr(config, "max_position_embeddings", None)
        budget = spec.max_tokens_in_flight or spec.max_batch_size * (self.max_positions or 2048)
        self.engine = Engine.for_model(
            self.module, self.tokenizer, max_tokens_in_flight=budget, max_batch=spec.max_batch_size, device=spec.device
        )
        self.client = LocalEngineClient(self.engine)
        if metrics is not None:
            metrics.add_engine(self.client.load)
            self.engine.on_token = lambda seq, previous, now: metrics.on_token(seq.arrived, previous, now)
        self.engine.start()
        self.model = model
        self.front = llm_routes.LLMFront(
            client=self.client,
            tokenizer=self.tokenizer,
            limits=openai_api.Limits.of_module(spec, self.module, budget),
            request_timeout_s=spec.request_timeout_s,
            max_request_bytes=spec.max_request_bytes,
            log_failure=log_failure,
            where="the replica log",
            on_prompt=metrics.on_prompt if metrics is not None else None,
        )

    def autoscaling_stats(self) -> dict[str, float]:
        """The engine's load: an LLM replica scales on waiting sequences and its token budget."""
        engine = self.engine
        return {
            WAITING: float(engine.blocked),  # waiting that the batch has no room for, not for the next step
            RUNNING: float(engine.running),
            BUDGET_USED: engine.tokens_in_flight / engine.max_tokens_in_flight,
        }

    async def answer(self, request: Request, path: str) -> Response | None:
        """This replica's answer on an LLM route, or None for the scoring routes' own."""
        if path == "/health" and request.method == "GET":  # this replica's batch, for a person or a test
            engine = self.engine
            batch = {"running": engine.running, "waiting": engine.waiting, "blocked": engine.blocked, **engine.finished}
            return json_response(200, {"ready": True, "engine": batch, "tokens_in_flight": engine.max_tokens_in_flight})
        if path == "/openapi.json" and request.method == "GET":
            from serving.openapi import document, scoring_paths

            title = f"nodewise: {self.spec.model_name} on Ray Serve (batching engine)"
            paths = scoring_paths(generate=True)  # /generate and the OpenAI routes, as on rank 0
            root = request.scope.get("root_path", "")
            return json_response(200, document(title, self.spec.model_version, paths, root))
        handler = llm_routes.ROUTES.get((request.method, path))
        if handler is None:
            return None
        response = await llm_routes.answer(self.front, handler, request)
        self.outcomes.add(ok=response.status_code < 500)
        return response

    async def predict(self, body: bytes, content_type: str) -> list[str]:
        """``/invocations`` (and the watchdog's canary): text prompts through the engine, each
        answered with the prompt and its greedy continuation of ``default_new_tokens``, as
        DeepSpeed's rank 0 answers them; parsed as MLflow parses them."""
        texts = _texts(self.model.parse(body, content_type))
        return await llm_routes.invocation_texts(self.front, texts, self.spec.default_new_tokens)

    def batch(self) -> dict[str, int]:
        return {"running": self.engine.running, "waiting": self.engine.waiting}

    def check_health(self) -> None:
        if not self.engine.alive:
            raise RuntimeError("the generation engine's thread is not running")

    def stop(self) -> None:
        self.engine.stop()


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
