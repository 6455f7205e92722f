"""The OpenAI-compatible API, in one place for both backends: ``POST /v1/completions``,
``POST /v1/chat/completions`` and ``GET /v1/models``.

A server parses a body with ``parse_request`` into a ``GenerationRequest`` (each prompt as token
ids, the sampling fields of ``serving/engine.py``), queues each prompt on its engine, and hands
the engine's events (``serving/messages.py``: ``TokenEvent`` ... ``EndEvent``) to ``response`` (one JSON body)
or ``stream`` (Server-Sent Events, as OpenAI sends them). Errors keep ``serving/errors.py``'s
statuses with OpenAI's body (``openai_error``), so the ``openai`` client raises the class it
would raise against OpenAI (``BadRequestError`` for a 400, ``NotFoundError`` for an unknown model).

What the engine cannot do is refused by name with a 400, not ignored: ``n`` or ``best_of`` over 1,
``echo``, ``logprobs``, penalties, ``logit_bias``, ``suffix``, tools and structured output.
Fields this API does not know are ignored, as vLLM ignores them. ``top_k`` is taken as vLLM and
SGLang take it (``extra_body={"top_k": 20}`` with the client).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from serving.errors import BadRequest, GenerationFailed, NotFound, RequestTimeout, encode_json, error_response
from serving.messages import EndEvent, ErrorEvent, Event, FinishReason, TokenEvent
from serving.protocol import ChatRequest, CompletionRequest, InvalidParameter, validate

Kind = Literal["completion", "chat"]
Events = Iterator[Event]
Decode = Callable[[list[int]], str]


class ModelNotFound(NotFound):
    """The request names a model this endpoint does not serve (404, ``model_not_found``)."""

    code = "MODEL_NOT_FOUND"


@dataclass
class GenerationRequest:
    """One OpenAI request, checked: what the engine runs and how the answer is shaped."""

    kind: Kind
    model: str
    prompts: list[list[int]]
    max_tokens: int
    sampling: dict[str, Any]  # SamplingParams fields other than max_tokens
    stream: bool = False
    include_usage: bool = False
    id: str = field(default_factory=lambda: f"{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def stops(self) -> tuple[str, ...]:
        return tuple(self.sampling.get("stop", ()))

    @property
    def object(self) -> str:
        return "chat.completion" if self.kind == "chat" else "text_completion"

    @property
    def response_id(self) -> str:
        return ("chatcmpl-" if self.kind == "chat" else "cmpl-") + self.id


@dataclass(frozen=True)
class Limits:
    """What the serving endpoint allows: checked before any prompt reaches the engine."""

    model: str
    default_max_tokens: int
    max_new_tokens: int
    max_prompts: int
    max_positions: int | None = None
    vocab_size: int | None = None
    tokens_in_flight: int | None = None

    @classmethod
    def of(cls, spec: Any, max_positions: int | None, vocab_size: int | None, tokens_in_flight: int | None) -> Limits:
        """The limits of a serving spec (either backend's: both name these fields alike) and its model."""
        return cls(
            model=spec.model_name,
            default_max_tokens=spec.default_new_tokens,
            max_new_tokens=spec.max_new_tokens,
            max_prompts=spec.max_batch_size,
            max_positions=max_positions,
            vocab_size=vocab_size,
            tokens_in_flight=tokens_in_flight,
        )

    @classmethod
    def of_module(cls, spec: Any, module: Any, tokens_in_flight: int) -> Limits:
        """``of`` with the positions and vocabulary read from a transformers module's config."""
        config = getattr(module, "config", None)
        positions, vocab = getattr(config, "max_position_embeddings", None), getattr(config, "vocab_size", None)
        return cls.of(spec, positions, vocab, tokens_in_flight)


def parse_request(kind: Kind, payload: Any, limits: Limits, tokenizer: Any) -> GenerationRequest:
    """``payload`` (a decoded JSON body) as a ``GenerationRequest``, through ``serving/protocol.py``'s
    models; a 400 naming the field when it is not one the engine can run, a 404 when it names
    another model."""
    parsed = validate(ChatRequest if kind == "chat" else CompletionRequest, payload)
    model = parsed.model if parsed.model is not None else limits.model
    if model != limits.model:
        raise ModelNotFound(f"the model {model!r} is not served here; this endpoint serves {limits.model!r}")
    if isinstance(parsed, ChatRequest):
        prompts = _chat_prompt(parsed, tokenizer)
    else:
        prompts = _completion_prompts(parsed, tokenizer, limits)
    if parsed.stream and len(prompts) > 1:
        raise InvalidParameter("prompt", f"a streamed request takes one prompt; got {len(prompts)}")
    longest = max(len(p) for p in prompts)
    max_tokens = _max_tokens(parsed, limits, longest)
    if parsed.stops and tokenizer is None:
        raise InvalidParameter("stop", "stop strings need the model's tokenizer (pytorch flavour has none)")
    parsed.sampling(max_tokens)  # the engine's own check of the whole set
    if limits.max_positions is not None and longest + max_tokens > limits.max_positions:
        raise InvalidParameter(
            "max_tokens",
            f"the prompt ({longest} tokens) plus max_tokens={max_tokens} is over the model's context of "
            f"{limits.max_positions} tokens; shorten the prompt or lower max_tokens",
        )
    if limits.tokens_in_flight is not None and longest + max_tokens > limits.tokens_in_flight:
        raise InvalidParameter(
            "max_tokens",
            f"the prompt ({longest} tokens) plus max_tokens={max_tokens} is over the {limits.tokens_in_flight} "
            "tokens this deployment holds at once; shorten the prompt or lower max_tokens",
        )
    sampling = parsed.sampling_fields()
    return GenerationRequest(kind, model, prompts, max_tokens, sampling, bool(parsed.stream), parsed.include_usage)


def _completion_prompts(parsed: CompletionRequest, tokenizer: Any, limits: Limits) -> list[list[int]]:
    """Each prompt as token ids: text through the tokenizer, ids within the vocabulary."""
    items = parsed.prompts
    if len(items) > limits.max_prompts:
        raise InvalidParameter("prompt", f"{len(items)} prompts is over the limit of {limits.max_prompts} a request")
    prompts = []
    for item in items:
        if isinstance(item, str):
            prompts.append(_encode(tokenizer, item))
            continue
        if limits.vocab_size is not None and not all(t < limits.vocab_size for t in item):
            raise InvalidParameter("prompt", f"token ids must be within 0-{limits.vocab_size - 1}")
        prompts.append(list(item))
    return prompts


def _chat_prompt(parsed: ChatRequest, tokenizer: Any) -> list[list[int]]:
    """The conversation through the model's own chat template, ending where the assistant speaks."""
    plain = [{"role": m.role, "content": m.text} for m in parsed.messages]
    if tokenizer is None:
        raise BadRequest("this model has no tokenizer (pytorch flavour); chat needs one: use /v1/completions")
    if not getattr(tokenizer, "chat_template", None):
        raise BadRequest(
            "this model's tokenizer has no chat template, so a conversation cannot be turned into a prompt; "
            "use /v1/completions, or register the model with a tokenizer that has a chat_template"
        )
    for text in (m["content"] for m in plain):
        _check_text(text)
    try:
        encoded = tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=True)
    except Exception as e:  # jinja2's TemplateError: the template refuses these messages (roles, order)
        raise InvalidParameter("messages", f"the model's chat template refused the messages: {e}") from e
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    ids = [int(t) for t in (ids[0] if ids and isinstance(ids[0], list) else ids)]
    if not ids:
        raise InvalidParameter("messages", "the chat template made an empty prompt of these messages")
    return [ids]


def _max_tokens(parsed: CompletionRequest | ChatRequest, limits: Limits, prompt_tokens: int) -> int:
    chosen = getattr(parsed, "max_completion_tokens", None)
    name, value = ("max_completion_tokens", chosen) if chosen is not None else ("max_tokens", parsed.max_tokens)
    if value is None:
        if isinstance(parsed, CompletionRequest):  # OpenAI's default for completions
            return min(limits.default_max_tokens, limits.max_new_tokens)
        room = limits.max_new_tokens  # a chat answer may run to the deployment's limit, within the context
        if limits.max_positions is not None:
            room = min(room, limits.max_positions - prompt_tokens)
        if room < 1:
            raise InvalidParameter("messages", f"the conversation ({prompt_tokens} tokens) fills the model's context")
        return room
    if value > limits.max_new_tokens:
        raise InvalidParameter(
            name, f"{name}={value} is over this deployment's limit of {limits.max_new_tokens} new tokens"
        )
    return value


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRequest(f"a prompt holds {e.object[e.start : e.end]!a}, a lone surrogate; send valid Unicode") from e


def _encode(tokenizer: Any, text: str) -> list[int]:
    if tokenizer is None:
        raise InvalidParameter("prompt", "this model has no tokenizer (pytorch flavour): send token ids, not text")
    _check_text(text)
    ids = [int(t) for t in tokenizer(text)["input_ids"]]
    if not ids:
        raise InvalidParameter("prompt", "a prompt is empty after tokenization; send some text")
    return ids


# -- answers ------------------------------------------------------------------------------------


class TextStream:
    """The text of a growing list of tokens, handed out in pieces that never have to be taken back:
    it stops at the first stop string, holds back an end that could begin one, and holds back a
    trailing replacement character (a character whose bytes are not all decoded yet)."""

    def __init__(self, decode: Decode, stops: tuple[str, ...] = ()) -> None:
        self.decode = decode
        self.stops = stops
        self.tokens: list[int] = []
        self.sent = ""
        self.stopped = False

    def add(self, token: int) -> str:
        if self.stopped:
            return ""
        self.tokens.append(token)
        text, self.stopped = cut_at_stop(self.decode(self.tokens), self.stops)
        if not self.stopped:
            text = text[: len(text) - _held(text, self.stops)]
        return self._emit(text)

    def flush(self) -> str:
        """What is left at the end (the held-back tail, now known not to begin a stop string)."""
        text, _ = cut_at_stop(self.decode(self.tokens), self.stops)
        return self._emit(text)

    def _emit(self, text: str) -> str:
        # Only what grew past what was sent (a decoder that rewrites earlier text is not followed back).
        if len(text) <= len(self.sent):
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece


def cut_at_stop(text: str, stops: tuple[str, ...] | list[str]) -> tuple[str, bool]:
    """``text`` up to its first stop string (the stop string not included), and whether it had one."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _held(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` to hold back."""
    held = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:size]):
                held = size
                break
    if text[len(text) - held - 1 : len(text) - held] == "\ufffd":
        held += 1
    return held


def collect(events: Events) -> tuple[list[int], FinishReason]:
    """The tokens and the finish reason of one sequence's events; ``GenerationFailed`` with the
    engine's reason when the sequence failed."""
    tokens: list[int] = []
    for event in events:
        match event:
            case TokenEvent(token):
                tokens.append(token)
            case ErrorEvent(message):  # the engine's one line on why, just before its end
                raise GenerationFailed(message)
            case EndEvent(FinishReason.ERROR):
                raise RuntimeError("the engine's step failed (every sequence in it ended)")
            case EndEvent(reason):
                return tokens, reason
    return tokens, FinishReason.LENGTH


def response(
    request: GenerationRequest, results: list[tuple[list[int], FinishReason]], decode: Decode
) -> dict[str, Any]:
    """The whole answer: one choice per prompt (its finish reason as OpenAI names it), and the usage counts."""
    choices = []
    for index, (tokens, finish) in enumerate(results):
        text, _ = cut_at_stop(decode(tokens), request.stops)
        reason = finish.openai
        if request.kind == "chat":
            message = {"role": "assistant", "content": text}
            choices.append({"index": index, "message": message, "finish_reason": reason, "logprobs": None})
        else:
            choices.append({"index": index, "text": text, "finish_reason": reason, "logprobs": None})
    completion = sum(len(tokens) for tokens, _ in results)
    return {**_head(request), "choices": choices, "usage": _usage(request, completion)}


async def stream(request: GenerationRequest, events: AsyncIterator[Event], decode: Decode) -> AsyncIterator[bytes]:
    """Server-Sent Events for one prompt: a chunk per piece of text, the finish reason, the usage
    when asked for (``stream_options.include_usage``), then ``data: [DONE]``. An engine failure
    mid-stream is an ``error`` event with the engine's reason (the ``openai`` client raises it).

    It reads the events on the caller's event loop, as they come: no thread per chunk (a
    thread hop per token cost rank 0 a fifth of its streamed tokens/s, issue 29)."""
    text = TextStream(decode, request.stops)
    count = 0
    if request.kind == "chat":
        yield _chunk(request, {"role": "assistant", "content": ""}, None)
    try:
        async for event in events:
            match event:
                case TokenEvent(token):
                    count += 1
                    piece = text.add(token)
                    if piece:
                        yield _chunk(request, _delta(request, piece), None)
                    continue
                case ErrorEvent(message):
                    yield sse({"error": {"message": message, "type": "server_error", "code": "generation_failed"}})
                    return
                case EndEvent(FinishReason.ERROR):
                    failed = "the generation failed; see the server log"
                    yield sse({"error": {"message": failed, "type": "server_error"}})
                    return
                case EndEvent(reason):
                    rest = text.flush()
                    if rest:
                        yield _chunk(request, _delta(request, rest), None)
                    yield _chunk(request, {} if request.kind == "chat" else {"text": ""}, reason.openai)
                    break
    except RequestTimeout as e:  # the answer has begun: the failure is an event, not a status
        yield sse({"error": {"message": str(e), "type": "server_error", "code": "timeout"}})
        return
    if request.include_usage:
        yield sse({**_head(request, chunk=True), "choices": [], "usage": _usage(request, count)})
    yield b"data: [DONE]\n\n"


def models(model: str, created: int, max_positions: int | None) -> dict[str, Any]:
    """``GET /v1/models``: the one model this endpoint serves."""
    entry = {"id": model, "object": "model", "created": created, "owned_by": "nodewise"}
    if max_positions is not None:
        entry["max_model_len"] = max_positions
    return {"object": "list", "data": [entry]}


def openai_error(error: BaseException, log: Any = None, where: str = "the server log") -> tuple[int, bytes]:
    """(status, body) for ``error`` in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``,
    with the status (and request id for an unplanned error) of ``serving/errors.py``."""
    status, body = error_response(error, log, where)
    from serving.errors import decode_json

    plain = decode_json(body)
    kind = {401: "authentication_error", 404: "not_found_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error"
    )
    detail = {
        "message": plain["message"],
        "type": kind,
        "param": getattr(error, "param", None),
        "code": plain["error_code"].lower(),
    }
    return status, encode_json({"error": detail})


def sse(event: dict[str, Any]) -> bytes:
    return b"data: " + encode_json(event) + b"\n\n"


def _chunk(request: GenerationRequest, delta: dict[str, Any], reason: str | None) -> bytes:
    if request.kind == "chat":
        choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
    else:
        choice = {"index": 0, "text": delta.get("text", ""), "finish_reason": reason, "logprobs": None}
    return sse({**_head(request, chunk=True), "choices": [choice]})


def _delta(request: GenerationRequest, piece: str) -> dict[str, Any]:
    return {"content": piece} if request.kind == "chat" else {"text": piece}


def _head(request: GenerationRequest, chunk: bool = False) -> dict[str, Any]:
    kind = request.object + (".chunk" if chunk and request.kind == "chat" else "")
    return {"id": request.response_id, "object": kind, "created": request.created, "model": request.model}


def _usage(request: GenerationRequest, completion_tokens: int) -> dict[str, int]:
    prompt = sum(len(p) for p in request.prompts)
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}
