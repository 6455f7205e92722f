"""Rank 0's request handling: check a request before any rank sees it, then hand its work to the step loop.

``Frontend`` parses ``/invocations`` bodies (MLflow's scoring formats: token ids are a ``Forward``
pass, text prompts are returned for the LLM routes or, without the engine, a ``Generate``) and
checks ``/generate`` bodies with ``llm_routes.generation``, the Ray Serve replica's check. A 400
leaves before anything is queued. ``run`` queues one piece of work for the step loop
(``serving/step_loop.py``) and awaits its answer on the caller's event loop; ``add`` and ``cancel``
are the engine's commands, which the LLM routes reach through ``rank0_http.BroadcastEngineClient``.
It also holds rank 0's metrics.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import numpy as np

from serving._generate import check_length, integer_ids, tokenize
from serving._protocol import parse_body
from serving.errors import BadRequest, NotReady, RequestTimeout
from serving.messages import Add, Cancel, Command, Forward, Generate
from serving.metrics import EngineLoad, ServingMetrics
from serving.openai_api import Limits
from serving.spec import DeepSpeedSpec

if TYPE_CHECKING:
    from serving.llm_routes import Generation
    from serving.rank_health import ClusterView

_REQUEST_IDS = itertools.count()


class Frontend:
    """Rank 0's request handling: parse and validate, then hand a command to the step loop."""

    def __init__(self, spec: DeepSpeedSpec, view: ClusterView) -> None:
        self.spec = spec
        self.view = view
        self.model: Any = None  # LanguageModel once loaded
        self.commands: queue.Queue[tuple[Command, Future[Any]]] = queue.Queue()
        self.streams: dict[str, Any] = {}  # where each engine request's events go (put(event))
        self.engine: Any = None  # the step loop's engine (a fresh one after an error), for the metrics
        self.metrics: ServingMetrics | None = None
        self._limits: tuple[Any, Limits] | None = None  # (the model it is for, its limits)
        if spec.metrics:
            self.metrics = ServingMetrics(spec.model_name, spec.model_version, "deepspeed_mpi", spec.latency_target_s)
            self.metrics.queued.set_function(self.commands.qsize)

    def attach(self, engine: Any) -> None:
        """The step loop's engine: its tokens and its load are the LLM metrics."""
        metrics, first = self.metrics, self.engine is None
        self.engine = engine
        if metrics is None:
            return
        engine.on_token = lambda seq, previous, now: metrics.on_token(seq.arrived, previous, now)
        if first:
            metrics.add_engine(self._load)

    def _load(self) -> EngineLoad:
        engine = self.engine
        return EngineLoad(
            engine.running, engine.waiting, engine.tokens_in_flight, engine.max_tokens_in_flight, engine.blocked
        )

    @property
    def batching(self) -> bool:
        """Whether generation runs on the continuous-batching engine (else one whole request a step)."""
        return bool(getattr(self.model, "can_generate", False)) and self.spec.batching

    @property
    def limits(self) -> Limits:
        """What a request may ask of this deployment (the Ray Serve replica's ``Limits``), worked out
        once per loaded model: every request reads it."""
        model = self.model
        if self._limits is None or self._limits[0] is not model:
            limits = Limits.of(
                self.spec,
                max_positions=getattr(model, "max_positions", None),
                vocab_size=getattr(model, "vocab_size", None),
                tokens_in_flight=model.tokens_in_flight if self.batching else None,
            )
            self._limits = (model, limits)
        return self._limits[1]

    # -- the step loop's work ------------------------------------------------------------
    async def run(self, work: Forward | Generate) -> tuple[Any, float]:
        """``work`` done by every rank at the step loop's next step: its result and the ranks'
        compute time (ms). The answer comes back to this event loop with no thread of its own."""
        self.check_ready()
        done: Future[Any] = Future()
        self.commands.put((work, done))
        try:  # shielded: a client gone does not cancel what the ranks may already run
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(done)), self.spec.request_timeout_s)
        except TimeoutError as e:
            raise RequestTimeout(f"no answer within {self.spec.request_timeout_s:.0f} s") from e

    def add(self, prompt: Any, new_tokens: int, sampling: dict[str, Any], events: Any, request_id: str) -> None:
        """Queue one prompt to join the engine's batch at the next step; ``events`` receives its events."""
        if self.metrics is not None:
            self.metrics.on_prompt(len(prompt))
        self.streams[request_id] = events
        self.commands.put((Add(request_id, tuple(int(t) for t in prompt), new_tokens, sampling), Future()))

    def cancel(self, request_id: str) -> None:
        """The client is gone: the request leaves the batch at the next step."""
        self.commands.put((Cancel(request_id), Future()))

    def check_ready(self) -> None:
        health = self.view.health()
        if self.model is None or not health["ready"]:
            raise NotReady(health["problems"] or ["the model is loading"])

    # -- /invocations ----------------------------------------------------------------------
    def invocation(self, body: bytes, content_type: str) -> Forward | list[str]:
        """An ``/invocations`` body: token ids as a ``Forward`` pass, or text prompts (each answered
        with the prompt and its greedy continuation)."""
        data = parse_body(body, content_type)
        if isinstance(data, dict):
            if len(data) != 1:
                raise BadRequest(f"this model takes one input; got named inputs {sorted(data)}")
            data = next(iter(data.values()))
        if hasattr(data, "to_numpy"):  # a one-column DataFrame of prompts or ids
            data = data.to_numpy()
            if data.ndim == 2 and data.shape[1] == 1 and data.dtype == object:
                column = data[:, 0]
                if not all(isinstance(v, str | int | float) for v in column):
                    raise BadRequest("a one-column DataFrame holds one prompt (a string) per row; got nested values")
                data = column.astype(str)
        array = np.asarray(data)
        if array.dtype.kind in "US":
            return [str(t) for t in array.reshape(-1)]
        ids = self._token_ids(array, "inputs")
        if ids.ndim != 2:
            raise BadRequest(f"inputs has shape {list(ids.shape)}; send token ids as [batch, sequence]")
        return Forward(ids)

    def text_work(self, texts: list[str]) -> Generate:
        """Text prompts without the engine: one greedy ``Generate`` of the default length."""
        limits = self.limits
        prompts = tokenize(texts, limits, self.model.tokenizer)
        longest = max(len(p) for p in prompts)
        check_length(longest + self.spec.default_new_tokens, limits, prompt_tokens=longest)
        return Generate([np.asarray(p, dtype=np.int64) for p in prompts], self.spec.default_new_tokens)

    # -- /generate without the engine --------------------------------------------------------
    def generation(self, body: bytes) -> Generation:
        """A ``/generate`` body checked as the LLM routes check it (``llm_routes.generation``)."""
        from serving.llm_routes import generation

        return generation(body, self.limits, self.model.tokenizer if self.model else None)

    def generate_work(self, request: Generation) -> Generate:
        """``/generate`` without the engine: whole requests, greedy, not streamed."""
        if request.stream:
            raise BadRequest("streaming needs the batching engine (NODEWISE_DEEPSPEED__BATCHING=true)")
        if not request.params.greedy or request.params.stop:
            raise BadRequest(
                "sampling and stop strings need the batching engine (NODEWISE_DEEPSPEED__BATCHING=true); "
                "this deployment decodes greedily only"
            )
        return Generate([np.asarray(p, dtype=np.int64) for p in request.prompts], request.params.max_tokens)

    def decode(self, ids: list[int]) -> str:
        return self.model.tokenizer.decode(ids, skip_special_tokens=True)

    # -- token ids -------------------------------------------------------------------------
    def _token_ids(self, array: np.ndarray, name: str) -> np.ndarray:
        if array.size == 0:
            raise BadRequest(f"{name} is empty; send at least one token id")
        ids = integer_ids(array, name, self.model.vocab_size if self.model else None)
        if ids.ndim == 2:
            if ids.shape[0] > self.spec.max_batch_size:
                raise BadRequest(f"{ids.shape[0]} sequences is over the limit of {self.spec.max_batch_size}")
            limit = self.model.max_positions if self.model else None
            if limit is not None and ids.shape[1] > limit:
                raise BadRequest(f"{ids.shape[1]} tokens (prompt plus new tokens) is over the model's limit of {limit}")
        return ids
