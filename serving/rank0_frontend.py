"""Rank 0's request handling for the scoring routes: parse and validate, then hand a command to the step loop.

``Frontend`` checks ``/invocations`` and ``/generate`` bodies (a 400 before any rank sees a bad
one), queues ``Forward``/``Generate`` work and the engine's ``Add``/``Cancel`` commands for the
step loop (``serving/step_loop.py``) and waits for their answers; it also holds rank 0's metrics.
The LLM routes reach the same queue through ``rank0_http.BroadcastEngineClient``.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from concurrent.futures import Future
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np

from serving._generate import tokenize
from serving._protocol import encode_predictions, parse_body
from serving.errors import (
    BadRequest,
    NotReady,
    RequestTimeout,
    decode_json,
    encode_json,
)
from serving.messages import (
    Add,
    Cancel,
    Command,
    Event,
    Forward,
    Generate,
)
from serving.metrics import EngineLoad, ServingMetrics
from serving.openai_api import cut_at_stop
from serving.spec import DeepSpeedSpec

if TYPE_CHECKING:
    from serving.rank_health import ClusterView

_REQUEST_IDS = itertools.count()


class Frontend:
    """Rank 0's request handling: parse and validate, then hand a command to the step loop."""

    def __init__(self, spec: DeepSpeedSpec, view: ClusterView) -> None:
        self.spec = spec
        self.view = view
        self.model: Any = None  # LanguageModel once loaded
        self.commands: queue.Queue[tuple[Command, Future[Any]]] = queue.Queue()
        self.timing = threading.local()  # the ranks' compute time of this thread's last request
        self.sequences: dict[str, Future[Any]] = {}  # the engine's requests by id, until they finish
        self.streams: dict[str, queue.Queue[Event]] = {}  # where a streamed request's tokens go
        self.engine: Any = None  # the step loop's engine (a fresh one after an error), for the metrics
        self.metrics: ServingMetrics | None = None
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
        return EngineLoad(engine.running, engine.waiting, engine.tokens_in_flight, engine.max_tokens_in_flight)

    def submit(self, command: Forward | Generate) -> Any:
        self.check_ready()
        done: Future[Any] = Future()
        self.commands.put((command, done))
        try:
            result, self.timing.ms = done.result(timeout=self.spec.request_timeout_s)
            return result
        except TimeoutError as e:
            raise RequestTimeout(f"no answer within {self.spec.request_timeout_s:.0f} s") from e

    def generate_ids(
        self, prompts: list[np.ndarray], new_tokens: int, sampling: dict[str, Any] | None = None
    ) -> list[list[int]]:
        """New token ids for each prompt (greedy). A model that can generate goes through the
        continuous-batching engine: each prompt joins the batch every rank runs, so concurrent
        requests share decoding steps; otherwise the whole request is one step."""
        if not getattr(self.model, "can_generate", False) or not self.spec.batching:
            return self.submit(Generate(prompts, new_tokens))
        for prompt in prompts:
            self._check_budget(len(prompt), new_tokens)
        self.check_ready()
        waits = [self.add(prompt, new_tokens, sampling or {}) for prompt in prompts]
        deadline = time.monotonic() + self.spec.request_timeout_s
        outputs, slowest = [], 0.0
        for _, done in waits:
            try:
                tokens, ms = done.result(timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError as e:
                for other, _ in waits:  # free their slots at the next step
                    self.commands.put((Cancel(other), Future()))
                raise RequestTimeout(f"no answer within {self.spec.request_timeout_s:.0f} s") from e
            outputs.append(tokens)
            slowest = max(slowest, ms)
        self.timing.ms = slowest
        return outputs

    # -- /invocations ----------------------------------------------------------------------
    def invocations(self, body: bytes, content_type: str) -> bytes:
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
            texts = [str(t) for t in array.reshape(-1)]
            return encode_predictions(self._generate_texts(texts, self.spec.default_new_tokens))
        ids = self._token_ids(array, "inputs")
        if ids.ndim != 2:
            raise BadRequest(f"inputs has shape {list(ids.shape)}; send token ids as [batch, sequence]")
        return encode_predictions(self.submit(Forward(ids)))

    # -- /generate -------------------------------------------------------------------------
    def generate(self, body: bytes) -> bytes:
        payload = decode_json(body)
        if not isinstance(payload, dict) or ("prompt" in payload) == ("input_ids" in payload):
            raise BadRequest('send {"prompt": "text" or ["text", ...]} or {"input_ids": [[id, ...], ...]}')
        new_tokens = payload.get("max_new_tokens", self.spec.default_new_tokens)
        if not isinstance(new_tokens, int) or isinstance(new_tokens, bool) or not new_tokens >= 1:
            raise BadRequest(f"max_new_tokens={new_tokens!r} must be a positive integer")
        if new_tokens > self.spec.max_new_tokens:
            raise BadRequest(
                f"max_new_tokens={new_tokens} is over this deployment's limit of {self.spec.max_new_tokens}"
            )
        sampling = self._sampling(payload, new_tokens)
        stream = payload.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest(f"stream={stream!r} must be true or false")
        if stream:  # with the engine, /generate is serving/llm_routes.py's (streamed there)
            raise BadRequest("streaming needs the batching engine (NODEWISE_DEEPSPEED__BATCHING=true)")
        if "prompt" in payload:
            prompts = payload["prompt"] if isinstance(payload["prompt"], list) else [payload["prompt"]]
            if not prompts or not all(isinstance(p, str) for p in prompts):
                raise BadRequest('"prompt" must be a string or a non-empty list of strings')
            return encode_json({"generated_text": self._generate_texts(prompts, new_tokens, sampling)})
        rows = payload["input_ids"]
        if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and r for r in rows):
            raise BadRequest('"input_ids" must be a non-empty list of non-empty lists of token ids')
        if len(rows) > self.spec.max_batch_size:
            raise BadRequest(f"{len(rows)} sequences is over the limit of {self.spec.max_batch_size} per request")
        prompts = [self._token_row(r) for r in rows]
        self._check_length(max(len(p) for p in prompts) + new_tokens)
        return encode_json({"output_ids": self.generate_ids(prompts, new_tokens, sampling)})

    def add(
        self,
        prompt: np.ndarray,
        new_tokens: int,
        sampling: dict[str, Any],
        stream: Any = None,
        request_id: str | None = None,
    ) -> tuple[str, Future[Any]]:
        """Queue one prompt to join the engine's batch at the next step; its id and its answer.
        ``stream`` receives its tokens as they come."""
        request_id = request_id or f"r{next(_REQUEST_IDS)}"
        if self.metrics is not None:
            self.metrics.on_prompt(len(prompt))
        if stream is not None:
            self.streams[request_id] = stream
        done: Future[Any] = Future()
        self.commands.put((Add(request_id, tuple(int(t) for t in prompt), new_tokens, sampling), done))
        return request_id, done

    def _check_budget(self, prompt_tokens: int, new_tokens: int) -> None:
        """One request the engine could never hold is a 400 here, before any rank sees it."""
        budget = self.model.tokens_in_flight
        if prompt_tokens + new_tokens > budget:
            raise BadRequest(
                f"{prompt_tokens} prompt tokens plus max_new_tokens={new_tokens} is over the {budget} tokens "
                "this deployment holds at once; shorten the prompt or ask for fewer tokens"
            )

    def check_ready(self) -> None:
        health = self.view.health()
        if self.model is None or not health["ready"]:
            raise NotReady(health["problems"] or ["the model is loading"])

    def cancel(self, request_id: str) -> None:
        """The client is gone: the request leaves the batch at the next step."""
        self.commands.put((Cancel(request_id), Future()))

    def _sampling(self, payload: dict[str, Any], new_tokens: int) -> dict[str, Any]:
        """The request's sampling parameters (serving/engine.py's), checked; a sampled one without a
        seed gets one drawn here, on rank 0, so every rank draws the same tokens."""
        from serving.engine import SamplingParams
        from serving.openai_api import sampling_fields

        fields = sampling_fields(payload, self.model.tokenizer if self.model is not None else None)
        params = SamplingParams(max_tokens=new_tokens, **fields)
        engine = getattr(self.model, "can_generate", False) and self.spec.batching
        if (not params.greedy or params.stop) and not engine:
            raise BadRequest(
                "sampling and stop strings need the batching engine (NODEWISE_DEEPSPEED__BATCHING=true); "
                "this deployment decodes greedily only"
            )
        return fields

    def _generate_texts(self, texts: list[str], new_tokens: int, sampling: dict[str, Any] | None = None) -> list[str]:
        prompts = self._tokenize(texts)
        self._check_length(max(len(p) for p in prompts) + new_tokens)
        outputs = self.generate_ids(prompts, new_tokens, sampling)
        stops = (sampling or {}).get("stop", ())
        decoded = [self.model.tokenizer.decode(o, skip_special_tokens=True) for o in outputs]
        return [t + cut_at_stop(d, stops)[0] for t, d in zip(texts, decoded, strict=True)]

    def _tokenize(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each prompt text, every way a text can be unusable a 400 (``_generate.tokenize``)."""
        tokenizer = self.model.tokenizer if self.model else None
        limits = SimpleNamespace(max_prompts=self.spec.max_batch_size)
        return [np.asarray(p, dtype=np.int64) for p in tokenize(texts, limits, tokenizer)]

    def _token_row(self, row: list[Any]) -> np.ndarray:
        """One sequence of ``input_ids``: a flat list of token ids."""
        try:
            array = np.asarray(row)
        except ValueError as e:
            raise BadRequest(f'"input_ids" rows must be flat lists of token ids ({e})') from e
        if array.ndim != 1:
            raise BadRequest(
                f'"input_ids" rows must be flat lists of token ids; got a row of shape {list(array.shape)}'
            )
        return self._token_ids(array, "input_ids")

    def _token_ids(self, array: np.ndarray, name: str) -> np.ndarray:
        if array.size == 0:
            raise BadRequest(f"{name} is empty; send at least one token id")
        if array.dtype.kind not in "iuf" or (array.dtype.kind == "f" and not np.all(np.mod(array, 1) == 0)):
            raise BadRequest(f"{name} must be integer token ids; got {array.dtype} values")
        if array.dtype.kind == "f" and np.abs(array).max() >= 2**62:  # before the cast, which would wrap
            raise BadRequest(f"{name} holds token ids far outside any vocabulary (up to {np.abs(array).max():.3g})")
        ids = array.astype(np.int64)
        vocab = self.model.vocab_size if self.model else None
        if vocab is not None and (ids.min() < 0 or ids.max() >= vocab):
            raise BadRequest(f"{name} holds token ids outside 0-{vocab - 1} (got {ids.min()}..{ids.max()})")
        if ids.ndim == 2:
            if ids.shape[0] > self.spec.max_batch_size:
                raise BadRequest(f"{ids.shape[0]} sequences is over the limit of {self.spec.max_batch_size}")
            self._check_length(ids.shape[1])
        return ids

    def _check_length(self, length: int) -> None:
        limit = self.model.max_positions if self.model else None
        if limit is not None and length > limit:
            raise BadRequest(f"{length} tokens (prompt plus new tokens) is over the model's limit of {limit}")
