"""One rank of a DeepSpeed tensor-parallel cluster: ``python -m serving.deepspeed_worker SPEC.json``.

Every rank derives its distributed environment from its launcher (``serving.dist_env``), loads
the model and takes its shard. Rank 0 also answers HTTP (the MLflow scoring protocol on
``POST /invocations``, ``POST /generate`` for causal LMs, ``GET /ping``, ``/health``, ``/version``):
it validates each request, broadcasts it, every rank computes, and rank 0 replies. Idle ranks
step together every ``tick_s`` seconds; each rank posts a heartbeat (state, step count, time
since its last step) to rank 0 every ``heartbeat_s``, so a dead rank (no heartbeat) and a hung
one (no step) are both seen. ``/ping`` is 200 only when every rank is ready and alive.

A rank that cannot start prints one line ``nodewise-worker error: ...`` and exits 1; the
launcher reports that line.
"""

from __future__ import annotations

import itertools
import os
import queue
import socket
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from serving._protocol import encode_predictions, parse_body
from serving.dist_env import DistEnv, DistEnvError, discover, network_exports, rendezvous_url, route_source
from serving.errors import (
    BadRequest,
    GenerationFailed,
    NotReady,
    RequestTimeout,
    decode_json,
    encode_json,
)
from serving.messages import (
    Add,
    Cancel,
    Command,
    EndEvent,
    ErrorEvent,
    Event,
    FinishReason,
    Forward,
    Generate,
    Plan,
    Tick,
    TokenEvent,
    Work,
)
from serving.metrics import EngineLoad, ServingMetrics
from serving.openai_api import cut_at_stop, sse
from serving.spec import SPEC_ENV, DeepSpeedSpec

ERROR_MARK = "nodewise-worker error:"
_OPENAI_ROUTES = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}
_REQUEST_IDS = itertools.count()


@dataclass
class Beat:
    """One rank's last heartbeat, as rank 0 keeps it."""

    rank: int
    pid: int
    host: str  # the rank's address on the route to rank 0: hosts that share a name still differ
    state: str
    steps: int
    step_age_s: float
    rss_bytes: int
    hostname: str = ""
    error: str | None = None
    phases: dict[str, float] = field(default_factory=dict)
    received: float = field(default_factory=time.monotonic)


class RankState:
    """What this rank reports about itself."""

    def __init__(self, rank: int, address: str) -> None:
        self.rank = rank
        self.address = address
        self.state = "starting"
        self.error: str | None = None
        self.steps = 0
        self.last_step = time.monotonic()
        self.busy_since: float | None = None
        self.phases: dict[str, float] = {}  # seconds each start-up phase took
        self._mark = time.monotonic()
        self.changed = threading.Event()  # a new state is reported at once, not at the next beat

    def enter(self, state: str) -> None:
        """Move to ``state``, timing the phase just finished."""
        now = time.monotonic()
        self.phases[self.state] = round(now - self._mark, 2)
        self.state, self._mark = state, now
        self.changed.set()

    def beat(self) -> dict[str, Any]:
        import psutil

        # A rank idle between ticks has an age up to tick_s; one stuck in a step grows without bound.
        since = self.busy_since or self.last_step
        return {
            "rank": self.rank,
            "pid": os.getpid(),
            "host": self.address,
            "hostname": socket.gethostname(),
            "state": self.state,
            "steps": self.steps,
            "step_age_s": round(time.monotonic() - since, 3),
            "rss_bytes": psutil.Process().memory_info().rss,
            "error": self.error,
            "phases": self.phases,
        }


class ClusterView:
    """Rank 0's picture of all ranks, from their heartbeats."""

    def __init__(self, spec: DeepSpeedSpec, world_size: int) -> None:
        self.spec = spec
        self.world_size = world_size
        self.beats: dict[int, Beat] = {}
        self.lock = threading.Lock()
        self.started = time.monotonic()
        # the batch as of the last step, and how many sequences ended by reason (length, stop, cancelled)
        self.engine: dict[str, int] = {"running": 0, "waiting": 0}

    def record(self, beat: dict[str, Any]) -> None:
        rank = int(beat["rank"])
        if not 0 <= rank < self.world_size:
            raise BadRequest(f"heartbeat from rank {rank}, outside 0-{self.world_size - 1}")
        with self.lock:
            self.beats[rank] = Beat(**{k: beat[k] for k in Beat.__dataclass_fields__ if k in beat})

    def health(self) -> dict[str, Any]:
        now = time.monotonic()
        stall = self.spec.tick_s + self.spec.request_timeout_s
        ranks, problems = [], []
        with self.lock:
            beats = dict(self.beats)
        for rank in range(self.world_size):
            beat = beats.get(rank)
            if beat is None:
                ranks.append({"rank": rank, "state": "no heartbeat"})
                problems.append(f"rank {rank}: no heartbeat yet")
                continue
            age = now - beat.received
            row = {**asdict(beat), "heartbeat_age_s": round(age, 3)}
            row.pop("received")
            ranks.append(row)
            if age > self.spec.heartbeat_timeout_s:
                problems.append(f"rank {rank} ({beat.host} pid {beat.pid}): no heartbeat for {age:.1f} s")
            elif beat.state != "ready":
                problems.append(f"rank {rank}: {beat.state}" + (f" ({beat.error})" if beat.error else ""))
            elif beat.step_age_s > stall:
                problems.append(f"rank {rank}: stuck in step {beat.steps + 1} for {beat.step_age_s:.1f} s")
        return {
            "ready": not problems,
            "world_size": self.world_size,
            "problems": problems,
            "ranks": ranks,
            "engine": dict(self.engine),
            "uptime_s": round(now - self.started, 1),
        }


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
        if stream:
            return self._stream_one(payload, new_tokens, sampling)
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

    # -- the OpenAI routes (serving/openai_api.py) -----------------------------------------
    def openai(self, kind: Any, body: bytes) -> Any:
        """``/v1/completions`` or ``/v1/chat/completions``: the JSON answer, or (request id, SSE
        chunks) for a streamed one, whose handler cancels the request if the client goes away."""
        from serving import openai_api

        if self.model is not None and not (self.model.can_generate and self.spec.batching):
            raise BadRequest(
                "the OpenAI routes need a generating model and the batching engine "
                "(NODEWISE_DEEPSPEED__BATCHING=true); use POST /invocations"
            )
        self.check_ready()
        model = self.model
        limits = openai_api.Limits.of(self.spec, model.module, model.tokens_in_flight)
        request = openai_api.parse_request(kind, decode_json(body), limits, model.tokenizer)
        queued = []
        for prompt in request.prompts:
            events: queue.Queue[Event] = queue.Queue()
            request_id, _ = self.add(np.asarray(prompt), request.max_tokens, request.sampling, events)
            queued.append((request_id, events))
        decode = _decoder(model.tokenizer)
        timeout = self.spec.request_timeout_s

        def events_of(request_id: str, events: queue.Queue[Event]) -> Any:
            return openai_api.events_of(events, timeout, lambda: self.cancel(request_id))

        if request.stream:
            [(request_id, events)] = queued
            return request_id, openai_api.stream(request, events_of(request_id, events), decode)
        try:
            results = [openai_api.collect(events_of(r, e)) for r, e in queued]
        except RequestTimeout:
            for request_id, _ in queued:
                self.cancel(request_id)
            raise
        return encode_json(openai_api.response(request, results, decode))

    def _stream_one(self, payload: dict[str, Any], new_tokens: int, sampling: dict[str, Any]) -> Any:
        """A streamed generation: one prompt, its tokens as Server-Sent Events while they come.
        Returns (request id, an iterator of events); the handler writes them and cancels the
        request if the client goes away."""
        if not (getattr(self.model, "can_generate", False) and self.spec.batching):
            raise BadRequest("streaming needs the batching engine (NODEWISE_DEEPSPEED__BATCHING=true)")
        if "prompt" in payload:
            if not isinstance(payload["prompt"], str):
                raise BadRequest('a streamed request takes one "prompt" string')
            [prompt] = self._tokenize([payload["prompt"]])  # the same checks as a prompt not streamed
        else:
            rows = payload["input_ids"]
            if not isinstance(rows, list) or len(rows) != 1 or not isinstance(rows[0], list) or not rows[0]:
                raise BadRequest('a streamed request takes one sequence: {"input_ids": [[id, ...]]}')
            prompt = self._token_row(rows[0])
        self._check_length(len(prompt) + new_tokens)
        self._check_budget(len(prompt), new_tokens)
        self.check_ready()
        events: queue.Queue[Event] = queue.Queue()
        request_id, _ = self.add(prompt, new_tokens, sampling, events)
        return request_id, self._events(request_id, events, len(prompt), sampling.get("stop", ()))

    def _events(self, request_id: str, events: queue.Queue[Event], prompt_tokens: int, stops: Any) -> Any:
        from serving.openai_api import TextStream

        text = TextStream(_decoder(self.model.tokenizer), tuple(stops)) if self.model.tokenizer is not None else None
        count = 0
        deadline = time.monotonic() + self.spec.request_timeout_s
        while True:
            try:
                event = events.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                self.cancel(request_id)
                yield sse({"error": {"message": f"no token within {self.spec.request_timeout_s:.0f} s"}})
                return
            match event:
                case TokenEvent(token):
                    count += 1
                    chunk: dict[str, Any] = {"token_id": token}
                    if text is not None:  # held back while it could be the start of a stop string
                        chunk["text"] = text.add(token)
                    yield sse(chunk)
                case ErrorEvent(message):  # the engine's reason, then its end (ERROR)
                    yield sse({"error": {"message": message, "code": "generation_failed"}})
                case EndEvent(reason):
                    if text is not None and (rest := text.flush()):
                        yield sse({"text": rest})
                    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": count}
                    yield sse({"finish_reason": reason.value, "usage": usage})
                    yield b"data: [DONE]\n\n"
                    return

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
        """Token ids of each prompt text, every way a text can be unusable a 400."""
        tokenizer = self.model.tokenizer if self.model else None
        if tokenizer is None:
            raise BadRequest("this model has no tokenizer (pytorch flavour): send token ids, not text")
        if not texts:
            raise BadRequest("no prompts (an empty list or a CSV without rows); send at least one")
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:  # JSON's "\\udb93": a half of a pair, no character at all
                raise BadRequest(
                    f"a prompt holds {e.object[e.start : e.end]!a}, a lone surrogate; send valid Unicode"
                ) from e
        if len(texts) > self.spec.max_batch_size:
            raise BadRequest(f"{len(texts)} prompts is over the limit of {self.spec.max_batch_size} per request")
        prompts = [np.asarray(tokenizer(t)["input_ids"], dtype=np.int64) for t in texts]
        if any(p.size == 0 for p in prompts):
            raise BadRequest("a prompt is empty after tokenization; send some text")
        return prompts

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


def _heartbeats(state: RankState, url: str, every_s: float, local: ClusterView | None) -> None:
    """Post this rank's heartbeat to rank 0 (rank 0 records its own directly)."""
    import httpx

    with httpx.Client(timeout=max(1.0, every_s)) as client:
        while True:
            beat = state.beat()
            try:
                if local is not None:
                    local.record(beat)
                else:
                    client.post(url, json=beat)
            except (httpx.HTTPError, BadRequest):
                pass  # rank 0 not listening yet, or gone: its own health shows it
            state.changed.wait(every_s)
            state.changed.clear()


def _step_loop(env: DistEnv, spec: DeepSpeedSpec, model: Any, state: RankState, frontend: Frontend | None) -> None:
    """Every rank: receive the next step's plan from rank 0, run it, and (rank 0) answer.

    A plan (``serving.messages.Plan``) is one broadcast: its work (a forward pass, a generation
    without the engine, or a tick when idle), the generation requests that join the engine's
    batch, and those cancelled. Every rank then runs the same
    engine step, so a decoding step costs one collective round for the whole batch (and one
    broadcast of its tokens, rank 0's, which every rank goes on with).
    """
    import torch.distributed as dist

    engine = _engine(model) if model.can_generate and spec.batching else None
    if frontend is not None and engine is not None:
        frontend.attach(engine)
    sequences: dict[str, Any] = {}
    held: list[tuple[Forward | Generate, Future[Any]]] = []  # rank 0: work waiting for its step
    while True:
        done: Future[Any] | None = None
        plan = Plan()
        if frontend is not None:
            plan, done = _plan(frontend, held, spec.tick_s, busy=engine is not None and engine.has_work())
        message: list[Any] = [plan]
        state.busy_since = time.monotonic()
        dist.broadcast_object_list(message, src=0)
        plan = message[0]
        adds, cancels = plan.adds, plan.cancels
        started = time.perf_counter()
        try:
            result = _run(model, plan.work)
        except Exception as e:  # every rank fails the same way on the same input; keep serving
            if done is not None:
                done.set_exception(e)
        else:
            if done is not None:
                done.set_result((result, (time.perf_counter() - started) * 1000))
        if engine is not None and (adds or cancels or engine.has_work()):
            engine = _engine_step(engine, model, sequences, adds, cancels, frontend)
            if frontend is not None and engine is not frontend.engine:  # a fresh one after an error
                frontend.attach(engine)
        state.steps += 1
        state.last_step = time.monotonic()
        state.busy_since = None


def _plan(
    frontend: Frontend, held: list[tuple[Forward | Generate, Future[Any]]], tick_s: float, busy: bool
) -> tuple[Plan, Future[Any] | None]:
    """Rank 0: the next step's plan from what the HTTP threads queued (waiting up to ``tick_s``
    for some when idle), and the future its work answers. Work beyond one piece waits in ``held``."""
    adds: list[Add] = []
    cancels: list[str] = []
    for command, future in _drain(frontend.commands, 0 if busy or held else tick_s):
        match command:
            case Add(request_id):
                adds.append(command)
                frontend.sequences[request_id] = future
            case Cancel(request_id):
                cancels.append(request_id)
            case Forward() | Generate():
                held.append((command, future))
    work, done = held.pop(0) if held else (Tick(), None)
    return Plan(work, tuple(adds), tuple(cancels)), done


def _run(model: Any, work: Work) -> Any:
    """A step's piece of work besides the engine's batch, on this rank."""
    match work:
        case Forward(ids):
            return model.forward(ids)
        case Generate(prompts, new_tokens):
            return model.generate(prompts, new_tokens)
    return None  # a tick


def _decoder(tokenizer: Any) -> Any:
    if tokenizer is None:
        return lambda ids: ""  # token ids only (pytorch flavour): no text to give
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def _drain(commands: queue.Queue[Any], wait_s: float) -> list[Any]:
    """What the HTTP threads queued: block up to ``wait_s`` for the first item, then take the rest."""
    items = []
    try:
        items.append(commands.get(timeout=wait_s) if wait_s > 0 else commands.get_nowait())
        while True:
            items.append(commands.get_nowait())
    except queue.Empty:
        return items


def _engine(model: Any) -> Any:
    """The engine every rank runs. With several ranks each step's tokens are rank 0's (one small
    broadcast after sampling): whether a sequence fails, and which token each one takes, is rank
    0's decision on every rank, so scores a rounding apart cannot split the ranks' batches."""
    import torch.distributed as dist

    engine = model.engine()
    if dist.is_initialized() and dist.get_world_size() > 1:
        engine.agree = _rank_0s_tokens
    return engine


def _rank_0s_tokens(tokens: Any) -> Any:
    import torch.distributed as dist

    dist.broadcast(tokens, src=0)
    return tokens


def _engine_step(
    engine: Any,
    model: Any,
    sequences: dict[str, Any],
    adds: tuple[Add, ...],
    cancels: tuple[str, ...],
    frontend: Frontend | None,
) -> Any:
    """One step of the engine on every rank; rank 0 answers the requests that finished.
    Returns the engine to go on with (a fresh one after an error, which every rank meets alike)."""
    from serving.engine import SamplingParams

    try:
        for add in adds:
            params = SamplingParams(max_tokens=add.max_tokens, **add.sampling)
            seq = sequences[add.request_id] = engine.add(add.prompt, params, request_id=add.request_id)
            if frontend is not None and add.request_id in frontend.streams:
                seq.events = frontend.streams.pop(add.request_id)  # before any step: no event is lost
        for request_id in cancels:
            if request_id in sequences:
                sequences[request_id].cancel()
        engine.step()
    except Exception as e:
        for request_id, seq in list(sequences.items()):
            seq.events.put(EndEvent(FinishReason.ERROR))
            future = frontend.sequences.pop(request_id, None) if frontend is not None else None
            if future is not None and not future.done():
                future.set_exception(e)
        sequences.clear()
        return _engine(model)
    if frontend is not None:
        frontend.view.engine = {"running": engine.running, "waiting": engine.waiting, **engine.finished}
    for request_id in [r for r, seq in sequences.items() if seq.done]:
        seq = sequences.pop(request_id)
        future = frontend.sequences.pop(request_id, None) if frontend is not None else None
        if future is not None and not future.done():
            if seq.finish_reason is FinishReason.CANCELLED:
                future.cancel()
            elif seq.finish_reason is FinishReason.ERROR:  # this sequence alone: the others are answered as usual
                future.set_exception(GenerationFailed(seq.error or f"{request_id} failed; see rank 0's log"))
            else:
                future.set_result((seq.tokens, ((seq.finished_at or 0) - seq.arrived) * 1000))
    return engine


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2) or (len(argv) == 2 and not argv[1].startswith("--launch=")):
        # --launch=ID names one launch of the job in every rank's command line (for its cleanup)
        print(f"{ERROR_MARK} usage: python -m serving.deepspeed_worker SPEC.json [--launch=ID]", file=sys.stderr)
        return 2
    try:
        # The launcher passes the spec in the environment (other hosts lack its state folder); the
        # path also names the job in every rank's command line (how a stop finds them on any host).
        spec = DeepSpeedSpec.model_validate_json(os.environ.get(SPEC_ENV) or Path(argv[0]).read_text())
        env = discover(os.environ)
        if env.world_size != spec.tp_size:
            raise DistEnvError(
                f"the launcher started {env.world_size} ranks but the spec asks for tp_size={spec.tp_size}; "
                f"start {spec.tp_size} ranks (mpirun -np {spec.tp_size})"
            )
        network = network_exports(env, os.environ)
    except (OSError, ValueError) as e:
        print(f"{ERROR_MARK} {e}", file=sys.stderr, flush=True)
        return 2
    os.environ.update({**env.exports(), **network})
    state = RankState(env.rank, route_source(env.master_addr) or "?")
    view = ClusterView(spec, env.world_size) if env.rank == 0 else None
    frontend = Frontend(spec, view) if view is not None else None
    if frontend is not None:
        from serving.http_server import HttpServer
        from serving.rank0_http import Rank0App

        try:
            server = HttpServer(Rank0App(frontend), spec.host, spec.port)
        except OSError as e:
            print(
                f"{ERROR_MARK} rank 0 cannot listen on {spec.host}:{spec.port} ({e.strerror}); pick a free port "
                "(NODEWISE_DEEPSPEED__PORT)",
                file=sys.stderr,
                flush=True,
            )
            return 1
        server.start_in_thread()  # uvicorn on its own thread and event loop; the step loop runs on this one
    url = f"http://{_url_host(env.master_addr)}:{spec.port}/internal/heartbeat"
    threading.Thread(target=_heartbeats, args=(state, url, spec.heartbeat_s, view), daemon=True).start()
    try:
        model = _start(env, spec, state, Path(argv[0]).resolve().parent)
    except Exception as e:
        state.error = f"{type(e).__name__}: {e}"
        state.enter("failed")
        print(f"{ERROR_MARK} rank {env.rank}: {e}", file=sys.stderr, flush=True)
        time.sleep(spec.heartbeat_s * 1.5)  # let rank 0 see why
        return 1
    if frontend is not None:
        frontend.model = model
    state.enter("ready")
    took = ", ".join(f"{k} {v:.1f} s" for k, v in state.phases.items())
    print(
        f"rank {env.rank}/{env.world_size} ready ({env.launcher}, master {env.master_addr}:{env.master_port}; {took})"
    )
    sys.stdout.flush()
    _step_loop(env, spec, model, state, frontend)
    return 0


def _start(env: DistEnv, spec: DeepSpeedSpec, state: RankState, folder: Path) -> Any:
    from datetime import timedelta

    state.enter("importing")

    import deepspeed
    import torch

    from serving._lm import LanguageModel

    state.enter("joining")
    if spec.device == "cuda":
        torch.cuda.set_device(env.local_rank)
    deepspeed.init_distributed(
        dist_backend="nccl" if spec.device == "cuda" else "gloo",
        auto_mpi_discovery=False,
        timeout=timedelta(seconds=spec.collective_timeout_s),
        init_method=rendezvous_url(env, folder),  # None: env://, torch's TCP store on MASTER_ADDR
        rank=env.rank,
        world_size=env.world_size,
    )
    if not env.all_local:
        # DeepSpeed's shared-memory all-reduce assumes every rank on one host and has no fallback
        # (its kernel runs on buffers only a one-host job sets up): ranks on several hosts all-reduce
        # through gloo over TCP instead.
        from deepspeed.comm import comm as ds_comm

        if getattr(ds_comm, "cdb", None) is not None:
            ds_comm.cdb.shm_vector_kernel_level = 0
    state.enter("loading")
    model = LanguageModel.load(spec)
    state.enter("sharding")
    model.shard(env.world_size)
    return model


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
