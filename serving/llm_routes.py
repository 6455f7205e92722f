"""Every LLM route, written once against an ``EngineClient`` (``serving/engine_client.py``).

``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models`` (OpenAI's API, through
``serving/openai_api.py``), ``POST /generate`` (prompts or token ids; streamed as rank 0 streams
it) and the text prompts of ``/invocations`` (``invocation_texts``). A host mounts them: ``app``
is a Starlette app of these routes; a Ray Serve replica dispatches to ``ROUTES`` under its prefix.
A streamed answer is a ``StreamingResponse``; a client that leaves cancels its sequence.

``generation`` is what ``/generate`` accepts: ``serving/protocol.py``'s ``GenerateRequest``, then
this deployment's limits (``_generate.py``'s prompt checks). Rank 0 without the engine checks its
``/generate`` with the same function.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from serving import openai_api, protocol
from serving.engine import SamplingParams
from serving.errors import RequestTimeout, decode_json, encode_json, error_response, receive_body
from serving.messages import EndEvent, ErrorEvent, Event, TokenEvent

_JSON = "application/json"
_SSE = "text/event-stream"
_IDS = itertools.count()


@dataclass
class LLMFront:
    """What the routes need of their host: the engine, the tokenizer, the limits and the spec's numbers."""

    client: Any  # an EngineClient
    tokenizer: Any
    limits: openai_api.Limits
    request_timeout_s: float
    max_request_bytes: int
    log_failure: Callable[[str, Exception], None] | None = None
    where: str = "the server log"  # where an unplanned error's traceback is (named in its 500)
    started: int = field(default_factory=lambda: int(time.time()))
    on_prompt: Callable[[int], None] | None = None  # the prompt tokens of each sequence (metrics)

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""  # token ids only (pytorch flavour): no text to give
        return self.tokenizer.decode(ids, skip_special_tokens=True)


# -- reading a sequence's events --------------------------------------------------------------
def _request_id() -> str:
    return f"r{next(_IDS)}-{uuid.uuid4().hex[:8]}"


async def events(
    front: LLMFront, prompt: list[int], params: SamplingParams, request_id: str | None = None
) -> AsyncIterator[Event]:
    """One prompt's events until its end; past the request timeout it is cancelled and
    ``RequestTimeout`` raised. Leaving early cancels it too."""
    request_id = request_id or _request_id()
    if front.on_prompt is not None:
        front.on_prompt(len(prompt))
    source = front.client.generate(prompt, params, request_id)
    deadline = asyncio.get_running_loop().time() + front.request_timeout_s
    try:
        while True:
            try:  # a timer, not wait_for's task per token
                async with asyncio.timeout_at(deadline):
                    event = await anext(source)
            except TimeoutError:
                front.client.cancel(request_id)
                raise RequestTimeout(f"no token within {front.request_timeout_s:.0f} s") from None
            yield event
            if isinstance(event, EndEvent):
                return
    finally:
        await source.aclose()


async def results(front: LLMFront, prompts: list[list[int]], params: SamplingParams) -> list[tuple[list[int], Any]]:
    """Each prompt's tokens and finish reason, run side by side; one failing (or the caller
    cancelled) cancels the others."""

    async def one(prompt: list[int]) -> tuple[list[int], Any]:
        return openai_api.collect(iter([event async for event in events(front, prompt, params)]))

    tasks = [asyncio.ensure_future(one(p)) for p in prompts]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


async def _closing(chunks: AsyncIterator[bytes], on_close: Callable[[], None]) -> AsyncIterator[bytes]:
    """``chunks``, then ``on_close`` when they end or their reader leaves (the host cancels this
    generator), which frees the sequence's slot at once rather than when the generators are collected."""
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        on_close()


# -- the OpenAI routes ------------------------------------------------------------------------
async def completions(front: LLMFront, request: Request) -> Response:
    return await _openai(front, "completion", request)


async def chat(front: LLMFront, request: Request) -> Response:
    return await _openai(front, "chat", request)


async def _openai(front: LLMFront, kind: Any, request: Request) -> Response:
    try:
        front.client.check_ready()
        body = await receive_body(request, front.max_request_bytes, front.request_timeout_s)
        parsed = openai_api.parse_request(kind, decode_json(body), front.limits, front.tokenizer)
        params = SamplingParams(max_tokens=parsed.max_tokens, **parsed.sampling)
        if parsed.stream:
            request_id = _request_id()
            source = events(front, parsed.prompts[0], params, request_id)
            chunks = _closing(openai_api.stream(parsed, source, front.decode), lambda: front.client.cancel(request_id))
            return StreamingResponse(chunks, media_type=_SSE)
        answers = await results(front, parsed.prompts, params)
        return Response(encode_json(openai_api.response(parsed, answers, front.decode)), media_type=_JSON)
    except Exception as e:  # OpenAI's error shape on its routes
        status, body = openai_api.openai_error(e, front.log_failure, where=front.where)
        return Response(body, status_code=status, media_type=_JSON)


async def models(front: LLMFront, request: Request) -> Response:
    answer = openai_api.models(front.limits.model, front.started, front.limits.max_positions)
    return Response(encode_json(answer), media_type=_JSON)


# -- /generate and /invocations ---------------------------------------------------------------
@dataclass
class Generation:
    """A ``/generate`` request, checked against the deployment: token ids per prompt, what the
    engine runs, and how the answer is shaped."""

    prompts: list[list[int]]
    params: SamplingParams
    texts: list[str] | None = None  # the prompts as sent, when sent as text
    stream: bool = False


def generation(body: bytes, limits: openai_api.Limits, tokenizer: Any) -> Generation:
    """A ``/generate`` body (``serving/protocol.py``'s ``GenerateRequest``) checked against this
    deployment's limits, tokenizer and vocabulary; every unusable value a 400 naming it."""
    from serving._generate import check_length, token_row, tokenize

    request = protocol.parse_generate(body)
    params = request.sampling(request.new_tokens(limits.default_max_tokens, limits.max_new_tokens))
    if params.stop and tokenizer is None:
        raise protocol.InvalidParameter("stop", "stop strings need the model's tokenizer (pytorch flavour has none)")
    texts = request.texts
    if request.stream and not (isinstance(request.prompt, str) or len(request.input_ids or ()) == 1):
        raise protocol.InvalidParameter(
            "stream", 'a streamed request takes one prompt: {"prompt": "text"} or {"input_ids": [[id, ...]]}'
        )
    if texts is not None:
        prompts = tokenize(texts, limits, tokenizer)
    else:
        rows = request.input_ids or []
        if len(rows) > limits.max_prompts:
            raise protocol.InvalidParameter(
                "input_ids", f"{len(rows)} sequences is over the limit of {limits.max_prompts} per request"
            )
        prompts = [token_row(r, limits) for r in rows]
    longest = max(len(p) for p in prompts)
    check_length(longest + params.max_tokens, limits, prompt_tokens=longest)
    return Generation(prompts, params, texts, bool(request.stream))


async def generate(front: LLMFront, request: Request) -> Response:
    front.client.check_ready()
    body = await receive_body(request, front.max_request_bytes, front.request_timeout_s)
    parsed = generation(body, front.limits, front.tokenizer)
    params = parsed.params
    if parsed.stream:
        chunks = _generate_stream(front, parsed.prompts[0], params)
        return StreamingResponse(chunks, media_type=_SSE, headers={"Cache-Control": "no-cache"})
    started = time.perf_counter()
    answers = await results(front, parsed.prompts, params)
    # the engine's time for it (submitted to the last sequence's end), as rank 0 always reported it
    timing = {"Server-Timing": f"compute;dur={(time.perf_counter() - started) * 1000:.2f}"}
    if parsed.texts is None:
        output = {"output_ids": [tokens for tokens, _ in answers]}
        return Response(encode_json(output), media_type=_JSON, headers=timing)
    stops = params.stop
    texts = [
        t + openai_api.cut_at_stop(front.decode(o), stops)[0] for t, (o, _) in zip(parsed.texts, answers, strict=True)
    ]
    return Response(encode_json({"generated_text": texts}), media_type=_JSON, headers=timing)


async def _generate_stream(front: LLMFront, prompt: list[int], params: SamplingParams) -> AsyncIterator[bytes]:
    """``/generate``'s Server-Sent Events: ``token_id`` (and ``text``, held back while it could
    begin a stop string) per token, an ``error`` when the sequence failed, then the finish reason
    and usage, then ``[DONE]``."""
    text = openai_api.TextStream(front.decode, tuple(params.stop)) if front.tokenizer is not None else None
    count = 0
    try:
        async for event in events(front, prompt, params):
            match event:
                case TokenEvent(token):
                    count += 1
                    chunk: dict[str, Any] = {"token_id": token}
                    if text is not None:
                        chunk["text"] = text.add(token)
                    yield openai_api.sse(chunk)
                case ErrorEvent(message):
                    yield openai_api.sse({"error": {"message": message, "code": "generation_failed"}})
                case EndEvent(reason):
                    if text is not None and (rest := text.flush()):
                        yield openai_api.sse({"text": rest})
                    usage = {"prompt_tokens": len(prompt), "completion_tokens": count}
                    yield openai_api.sse({"finish_reason": reason.value, "usage": usage})
                    yield b"data: [DONE]\n\n"
    except RequestTimeout as e:
        yield openai_api.sse({"error": {"message": str(e)}})


async def invocation_texts(front: LLMFront, texts: list[str], new_tokens: int) -> list[str]:
    """``/invocations`` with text prompts: each prompt and its greedy continuation of
    ``new_tokens``, checked as the OpenAI routes check a prompt."""
    payload = {"prompt": texts, "max_tokens": new_tokens}
    parsed = openai_api.parse_request("completion", payload, front.limits, front.tokenizer)
    answers = await results(front, parsed.prompts, SamplingParams(max_tokens=parsed.max_tokens))
    return [text + front.decode(tokens) for text, (tokens, _) in zip(texts, answers, strict=True)]


# -- mounting ---------------------------------------------------------------------------------
Handler = Callable[[LLMFront, Request], Awaitable[Response]]
ROUTES: dict[tuple[str, str], Handler] = {
    ("POST", "/v1/completions"): completions,
    ("POST", "/v1/chat/completions"): chat,
    ("GET", "/v1/models"): models,
    ("POST", "/generate"): generate,
}


async def answer(front: LLMFront, handler: Handler, request: Request) -> Response:
    """``handler``'s response; an error is mapped to its status in one place (``serving/errors.py``)."""
    try:
        return await handler(front, request)
    except Exception as e:
        status, body = error_response(e, front.log_failure, where=front.where)
        return Response(body, status_code=status, media_type=_JSON)


def app(front: LLMFront) -> Any:
    """A Starlette app of the LLM routes (a test, or a host that mounts it whole)."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    def endpoint(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def call(request: Request) -> Response:
            return await answer(front, handler, request)

        return call

    routes = [Route(path, endpoint(h), methods=[method]) for (method, path), h in ROUTES.items()]
    return Starlette(routes=routes)
