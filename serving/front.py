"""A DeepSpeed deployment's front: the address users call, which outlives the group behind it.

``python -m serving.front --upstream http://127.0.0.1:PORT --port PORT [--app NAME]`` proxies
every request to rank 0 (httpx). While rank 0 is not ready (connection refused, or its
``/health`` not ready) new requests wait in a bounded hold for at most ``hold_timeout_s`` (then
503 with ``Retry-After``; a full hold is a 503 at once) and go on when the group is ready again.
A request cut by the group's death is sent again when repeating gives the same answer: scoring
(``/invocations``), GETs, and generation that is greedy or seeded (a sampled request without a
seed gets one here). A ``/generate`` stream cut midway is sent again as its prompt plus the
token ids already sent, and the client's stream goes on where it stopped. ``GET /front`` says
what the front holds; ``GET /metrics`` is the front's counters followed by rank 0's metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from serving import protocol
from serving.errors import NotReady, ProtocolError, UpstreamFailed, error_body
from serving.http_server import HttpLimits
from serving.metrics import BY_NAME, CONTENT_TYPE

GENERATION = frozenset({"/generate", "/v1/completions", "/v1/chat/completions"})
CUT = (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError, httpx.ConnectTimeout)
PROBES = frozenset({"/ping", "/health"})
# Rank 0's uvicorn answers 503 past its connection limit (HttpLimits().max_connections, its
# default), and the ranks' heartbeats, the watchdog's canary and the front's own probes share it:
# the front's requests keep a quarter of it free (more wait in the front's pool).
UPSTREAM_CONNECTIONS = HttpLimits().max_connections * 3 // 4


@dataclass(frozen=True)
class FrontConfig:
    """What the front is started with."""

    upstream: str  # rank 0's address, e.g. http://127.0.0.1:8501
    app: str = "app"
    hold_timeout_s: float = 60.0  # the longest a request waits for the group
    max_held: int = 256  # requests waiting at once; past it, 503 at once
    poll_s: float = 0.25  # how often rank 0's readiness is read while it is down
    request_timeout_s: float = 300.0  # one upstream exchange (a whole answer, or between two stream events)


class HoldExpired(NotReady):
    """The group did not come back within the hold (503 with Retry-After)."""


@dataclass
class Hold:
    """The front's view of the group: ready or not, since when, why, and who waits."""

    ready: asyncio.Event = field(default_factory=asyncio.Event)
    since: float | None = None  # when the group was last seen going down (time.time())
    why: str = "not checked yet"
    held: int = 0


class FrontMetrics:
    """The front's counters (serving/metrics.py's SCHEMA, scope ``front``) in a registry of its own."""

    def __init__(self, app: str) -> None:
        self.registry = CollectorRegistry()

        def metric(cls: Any, name: str) -> Any:
            spec = BY_NAME[name]
            base = name.removesuffix("_total")
            return cls(base, spec.help, spec.labels, registry=self.registry)

        self.holds = metric(Counter, "nodewise_front_holds_total").labels(app)
        self.retries = metric(Counter, "nodewise_front_retries_total").labels(app)
        self.continued = metric(Counter, "nodewise_front_streams_continued_total").labels(app)
        self._refused = metric(Counter, "nodewise_front_hold_timeouts_total")
        self.held = metric(Gauge, "nodewise_front_held").labels(app)
        self.app = app

    def refused(self, reason: str) -> None:
        self._refused.labels(self.app, reason).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def prepare(path: str, method: str, body: bytes) -> tuple[bytes, dict[str, Any] | None, bool]:
    """(the body to send, its JSON object if a generation, whether repeating it is safe).

    A sampled generation without a seed (``protocol.is_sampled``, the rule rank 0 draws its own
    seed by) gets one here, so sending it again draws the same tokens."""
    if method in ("GET", "HEAD") or path == "/invocations":
        return body, None, True
    if path not in GENERATION:
        return body, None, False
    try:
        payload = json.loads(body)
    except ValueError:
        return body, None, False  # rank 0 answers the 400
    if not isinstance(payload, dict):
        return body, None, False
    temperature, top_k = payload.get("temperature"), payload.get("top_k")
    if not (_number(temperature) and (top_k is None or _number(top_k))):
        return body, payload, True  # greedy (no temperature), or a 400 from rank 0: the same answer again
    if protocol.is_sampled(temperature, top_k) and payload.get("seed") is None:
        payload["seed"] = protocol.draw_seed()
        body = json.dumps(payload).encode()
    return body, payload, True


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class Front:
    """The proxy: holds while the group is down, repeats what is safe, continues streams."""

    def __init__(self, config: FrontConfig) -> None:
        self.config = config
        self.hold = Hold()
        self.metrics = FrontMetrics(config.app)
        self.client: httpx.AsyncClient | None = None
        self.probe: httpx.AsyncClient | None = None  # /health and /metrics, never queued behind requests
        self._poller: asyncio.Task[None] | None = None

    # -- readiness ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the upstream client and start reading readiness (at the first request: the server
        runs without lifespan events)."""
        if self.client is not None:
            return
        limits = httpx.Limits(max_connections=UPSTREAM_CONNECTIONS, max_keepalive_connections=UPSTREAM_CONNECTIONS)
        timeout = httpx.Timeout(self.config.request_timeout_s, connect=2.0)
        self.client = httpx.AsyncClient(base_url=self.config.upstream, timeout=timeout, limits=limits)
        probe = httpx.Limits(max_connections=2, max_keepalive_connections=2)
        self.probe = httpx.AsyncClient(base_url=self.config.upstream, timeout=2.0, limits=probe)
        self._mark(await self._readiness())  # the first request does not wait for the poller
        self._poller = asyncio.create_task(self._poll())

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        for client in (self.client, self.probe):
            if client is not None:
                await client.aclose()

    def down(self, why: str) -> None:
        """The group stopped answering: new requests wait from now on."""
        if self.hold.ready.is_set() or self.hold.since is None:
            self.hold.since = time.time()
        self.hold.ready.clear()
        self.hold.why = why

    async def _poll(self) -> None:
        """Read rank 0's /health: often while it is down, now and then while it serves."""
        while True:
            why = await self._readiness()
            self._mark(why)
            await asyncio.sleep(self.config.poll_s if why else 1.0)

    def _mark(self, why: str | None) -> None:
        if why is None:
            self.hold.ready.set()
            self.hold.since, self.hold.why = None, ""
        else:
            self.down(why)

    async def _readiness(self) -> str | None:
        assert self.probe is not None
        try:
            response = await self.probe.get("/health")
        except httpx.HTTPError as e:
            return f"group restarting (rank 0 does not answer: {type(e).__name__})"
        try:
            ready = response.status_code == 200 and bool(response.json().get("ready"))
        except ValueError:
            ready = False
        return None if ready else f"group starting (rank 0's /health: HTTP {response.status_code}, not ready)"

    async def wait_ready(self, deadline: float) -> None:
        """Return once the group is ready; raise ``HoldExpired`` at ``deadline`` or when the hold is full."""
        if self.hold.ready.is_set():
            return
        if self.hold.held >= self.config.max_held:
            self.metrics.refused("full")
            raise NotReady(f"the front already holds {self.hold.held} requests (max_held); retry in a few seconds")
        self.hold.held += 1
        self.metrics.holds.inc()
        self.metrics.held.set(self.hold.held)
        try:
            await asyncio.wait_for(self.hold.ready.wait(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            self.metrics.refused("timeout")
            raise HoldExpired(
                f"the model's group was not ready within {self.config.hold_timeout_s:g} s ({self.hold.why}); "
                "retry later"
            ) from None
        finally:
            self.hold.held -= 1
            self.metrics.held.set(self.hold.held)

    def state(self) -> dict[str, Any]:
        """What ``GET /front`` answers (``nodewise status`` shows it)."""
        since = self.hold.since
        return {
            "upstream": self.config.upstream,
            "ready": self.hold.ready.is_set(),
            "held": self.hold.held,
            "why": self.hold.why,
            "down_for_s": round(time.time() - since, 1) if since is not None else 0.0,
            "hold_timeout_s": self.config.hold_timeout_s,
        }

    # -- requests ----------------------------------------------------------------------------
    async def send(self, request: Request, body: bytes, safe: bool, deadline: float) -> httpx.Response:
        """One whole exchange with rank 0, waiting and repeating as the group allows."""
        assert self.client is not None
        while True:
            await self.wait_ready(deadline)
            try:
                upstream = self.client.build_request(
                    request.method,
                    request.url.path,
                    params=request.query_params,
                    content=body,
                    headers=_headers(request),
                )
                response = await self.client.send(upstream, stream=True)
            except httpx.ConnectError as e:  # never reached rank 0: safe to send again, whatever it is
                self.down(f"group restarting (rank 0 refused a connection: {type(e).__name__})")
                self.metrics.retries.inc()
                continue
            except CUT as e:
                self._cut(e, safe)
                continue
            if response.status_code == 503:
                await response.aread()
                await response.aclose()
                if not _not_ready(response):  # rank 0 busy (its connection limit) or its own /health: passed on
                    return response
                self.down("group starting (rank 0 answered 503 NOT_READY)")  # nothing was done: send again
                self.metrics.retries.inc()
                continue
            return response

    def _cut(self, error: Exception, safe: bool) -> None:
        self.down(f"group restarting (a request was cut: {type(error).__name__})")
        if not safe:
            raise UpstreamFailed(
                "the model's group stopped while it answered this request, and sending it again could give "
                "another answer; send it again (set a seed or temperature 0 to have the front repeat it)"
            ) from error
        self.metrics.retries.inc()

    async def handle(self, request: Request) -> Response:
        await self.start()
        path = request.url.path
        if path in PROBES and not self.hold.ready.is_set():  # a health check is answered, not held
            return _error(NotReady(f"the front holds requests: {self.hold.why}"))
        body, payload, safe = prepare(path, request.method, await request.body())
        deadline = time.monotonic() + self.config.hold_timeout_s
        try:
            response = await self.send(request, body, safe, deadline)
        except ProtocolError as e:
            return _error(e)
        if payload is not None and payload.get("stream") is True and response.status_code == 200:
            stream = self.continued(request, response, payload, safe)
            return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            content = await response.aread()
        except CUT as e:
            await response.aclose()
            try:
                self._cut(e, safe)
            except ProtocolError as refused:
                return _error(refused)
            return await self.handle_again(request, body, safe, deadline)
        return Response(content, response.status_code, headers=_answer_headers(response))

    async def handle_again(self, request: Request, body: bytes, safe: bool, deadline: float) -> Response:
        """A whole answer cut midway: send it again (it is safe) until one arrives whole or time runs out."""
        while True:
            try:
                response = await self.send(request, body, safe, deadline)
                content = await response.aread()
            except ProtocolError as e:
                return _error(e)
            except CUT as e:
                self.metrics.retries.inc()
                self.down(f"group restarting (a request was cut: {type(e).__name__})")
                continue
            return Response(content, response.status_code, headers=_answer_headers(response))

    async def continued(
        self, request: Request, response: httpx.Response, payload: dict[str, Any], safe: bool
    ) -> AsyncIterator[bytes]:
        """The client's SSE stream: rank 0's events, and where a restart cut them, the rest from
        the new group (the prompt plus the tokens already sent, as ``input_ids``)."""
        progress = StreamProgress(payload)
        while True:
            try:
                async for event in progress.relay(response):
                    yield event
                return
            except CUT as e:
                await response.aclose()
                if not (safe and progress.can_continue(request.url.path)):
                    yield _sse({"error": {"message": "the model's group restarted mid-stream", "code": "BAD_GATEWAY"}})
                    return
                self.down(f"group restarting (a stream was cut: {type(e).__name__})")
            self.metrics.continued.inc()
            deadline = time.monotonic() + self.config.hold_timeout_s
            try:
                response = await self.send(request, progress.rest(), True, deadline)
            except ProtocolError as e:
                yield _sse({"error": {"message": str(e), "code": type(e).code}})
                return


class StreamProgress:
    """What a ``/generate`` stream has sent so far, and the request for the rest."""

    def __init__(self, payload: dict[str, Any]) -> None:
        self.payload = payload
        self.tokens: list[int] = []
        self.text: list[str] = []
        self.done = False

    def can_continue(self, path: str) -> bool:
        return path == "/generate" and not self.done

    async def relay(self, response: httpx.Response) -> AsyncIterator[bytes]:
        """Rank 0's events, one by one; raises a ``CUT`` error where the stream ends without ``[DONE]``."""
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                self.done = True
                yield b"data: [DONE]\n\n"
                return
            chunk = json.loads(data)
            if "token_id" in chunk:
                self.tokens.append(int(chunk["token_id"]))
                self.text.append(str(chunk.get("text", "")))
            elif isinstance(chunk.get("usage"), dict) and self.tokens:
                chunk["usage"] = self.usage(chunk["usage"])
                data = json.dumps(chunk)
            yield f"data: {data}\n\n".encode()
        raise httpx.RemoteProtocolError("the stream ended before [DONE]")

    def usage(self, usage: dict[str, Any]) -> dict[str, Any]:
        """The whole stream's usage (a continued stream's last part counts only itself)."""
        first = self.payload.get("_front_prompt_tokens")
        completion = len(self.tokens)
        return {**usage, "completion_tokens": completion} | ({"prompt_tokens": first} if first else {})

    def rest(self) -> bytes:
        """The request for the rest: the prompt plus the tokens sent, and that many fewer to make."""
        rest = {k: v for k, v in self.payload.items() if not k.startswith("_front")}
        if "input_ids" in rest:
            rest["input_ids"] = [[*rest["input_ids"][0], *self.tokens]]
            self.payload.setdefault("_front_prompt_tokens", len(self.payload["input_ids"][0]))
        else:  # no token ids were given: the text sent so far follows the prompt
            rest["prompt"] = str(rest["prompt"]) + "".join(self.text)
        wanted = rest.get("max_new_tokens")
        if isinstance(wanted, int):
            rest["max_new_tokens"] = max(1, wanted - len(self.tokens))
        return json.dumps(rest).encode()


def _not_ready(response: httpx.Response) -> bool:
    """A 503 that is rank 0's ``NotReady`` (``NOT_READY`` in its error body, or ``not_ready`` in
    OpenAI's), not uvicorn's connection limit."""
    try:
        body = response.json()
    except ValueError:
        return False
    if not isinstance(body, dict):
        return False
    inner = body.get("error")
    code = body.get("error_code") or (inner.get("code") if isinstance(inner, dict) else None)
    return str(code).upper() == NotReady.code


def _headers(request: Request) -> dict[str, str]:
    skip = {"host", "content-length", "connection", "transfer-encoding"}
    return {k: v for k, v in request.headers.items() if k.lower() not in skip}


def _answer_headers(response: httpx.Response) -> dict[str, str]:
    skip = {"content-length", "connection", "transfer-encoding", "content-encoding"}
    return {k: v for k, v in response.headers.items() if k.lower() not in skip}


def _sse(chunk: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(chunk)}\n\n".encode()


def _error(error: ProtocolError) -> Response:
    headers = {"x-nodewise-front": "1"}
    if isinstance(error, NotReady):
        headers["Retry-After"] = "5"
    return Response(error_body(error.code, str(error)), error.status, media_type="application/json", headers=headers)


def build_app(front: Front) -> Starlette:
    """The front's ASGI app: ``/front``, ``/metrics``, and everything else proxied."""

    async def state(request: Request) -> Response:
        await front.start()
        return JSONResponse(front.state())

    async def metrics(request: Request) -> Response:
        own = front.metrics.exposition()
        await front.start()
        assert front.probe is not None
        try:
            upstream = await front.probe.get("/metrics")
            rest = upstream.content if upstream.status_code == 200 else b""
        except httpx.HTTPError:
            rest = b""  # the group is down: the front's own counters still answer
        return Response(own + rest, media_type=CONTENT_TYPE)

    methods = ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]
    return Starlette(
        routes=[
            Route("/front", state),
            Route("/metrics", metrics),
            Route("/{path:path}", front.handle, methods=methods),
        ],
    )


def main(argv: list[str]) -> int:
    """``python -m serving.front --upstream URL --port PORT``: serve until SIGTERM or SIGINT."""
    from serving.http_server import HttpLimits, HttpServer

    parser = argparse.ArgumentParser(prog="python -m serving.front", description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="rank 0's address, e.g. http://127.0.0.1:8501")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--app", default="app")
    parser.add_argument("--hold-timeout-s", type=float, default=60.0)
    parser.add_argument("--max-held", type=int, default=256)
    args = parser.parse_args(argv)
    if args.hold_timeout_s <= 0 or args.max_held < 1:
        print(
            f"nodewise-front error: --hold-timeout-s ({args.hold_timeout_s}) must be > 0 and --max-held "
            f"({args.max_held}) >= 1",
            file=sys.stderr,
        )
        return 2
    config = FrontConfig(args.upstream.rstrip("/"), args.app, args.hold_timeout_s, args.max_held)
    try:
        server = HttpServer(build_app(Front(config)), args.host, args.port, HttpLimits(max_connections=1024))
    except OSError as e:
        print(
            f"nodewise-front error: cannot listen on {args.host}:{args.port} ({e.strerror}); choose a free port",
            file=sys.stderr,
        )
        return 1
    print(f"nodewise-front: {args.host}:{server.port} -> {config.upstream}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
