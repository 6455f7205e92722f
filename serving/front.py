"""A DeepSpeed deployment's front: the address users call, which outlives the group behind it.

``python -m serving.front --upstream http://127.0.0.1:PORT --port PORT [--app NAME] [--record
PATH]`` proxies every request to rank 0 (with aiohttp's client, whose HTTP parser is C: what the
front costs when nothing fails is ``benchmarks/front_cost.py``). While rank 0 is not ready
(connection refused, or its ``/health`` not ready) new requests wait in a bounded hold for at
most ``hold_timeout_s`` (then 503 with ``Retry-After``; a full hold is a 503 at once) and go on
when the group is ready again. A request cut by the group's death is sent again when repeating
gives the same answer: scoring (``/invocations``), GETs, and generation that is greedy or seeded
(a sampled request without a seed gets one here). A ``/generate`` stream cut midway is sent
again as its prompt plus the token ids already sent, and the client's stream goes on where it
stopped. With ``--record`` (the group's record) rank 0's address follows it across restarts.
``GET /front`` says what the front holds; ``GET /metrics`` is the front's counters followed by
rank 0's metrics.

This module is the request path and the app; the hold and repeat policy is ``front_hold.py``,
rank 0's address, clients and readiness ``front_upstream.py``, a stream's continuation
``front_stream.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from yarl import URL

from serving.errors import NotReady, ProtocolError, UpstreamFailed, error_body
from serving.front_hold import CUT, FrontConfig, FrontMetrics, Hold, not_ready, prepare
from serving.front_stream import StreamProgress, sse
from serving.front_upstream import Upstream
from serving.metrics import CONTENT_TYPE

__all__ = ["Front", "FrontConfig", "build_app", "main", "prepare"]

PROBES = frozenset({"/ping", "/health"})


class Front:
    """The proxy: holds while the group is down, repeats what is safe, continues streams.

    Composes the ``Hold`` (who waits and why), the ``Upstream`` (rank 0's address, clients,
    readiness) and the ``FrontMetrics``."""

    def __init__(self, config: FrontConfig) -> None:
        self.config = config
        self.metrics = FrontMetrics(config.app)
        self.hold = Hold(config, self.metrics)
        self.upstream = Upstream(config, self.hold)

    async def start(self) -> None:
        await self.upstream.start()

    async def stop(self) -> None:
        await self.upstream.stop()

    def state(self) -> dict[str, Any]:
        """What ``GET /front`` answers (``nodewise status`` shows it)."""
        return {"upstream": self.upstream.url, **self.hold.state(), "counts": self.metrics.totals()}

    async def send(self, request: Request, body: bytes, safe: bool, deadline: float) -> aiohttp.ClientResponse:
        """One exchange with rank 0 up to its answer's head, waiting and repeating as the group allows."""
        target, headers = _target(request), _headers(request)
        while True:
            await self.hold.wait_ready(deadline)
            client = self.upstream.client  # read at each try: a restart may have moved rank 0
            assert client is not None
            try:
                response = await client.request(request.method, target, data=body or None, headers=headers)
            except aiohttp.ClientConnectorError as e:  # never reached rank 0: safe to send again, whatever it is
                self.hold.down(f"group restarting (rank 0 refused a connection: {type(e).__name__})")
                self.metrics.retries.inc()
                continue
            except CUT as e:
                self._cut(e, safe)
                continue
            except RuntimeError:  # the client was closed under it: rank 0 moved (Upstream._move)
                if client is self.upstream.client:
                    raise
                self.metrics.retries.inc()
                continue
            if response.status == 503:
                try:
                    content = await response.read()  # kept: read() again gives it
                except CUT as e:
                    response.close()
                    self._cut(e, safe)
                    continue
                if not not_ready(content):  # rank 0 busy (its connection limit) or its own /health: passed on
                    return response
                self.hold.down("group starting (rank 0 answered 503 NOT_READY)")  # nothing was done: send again
                self.metrics.retries.inc()
                continue
            return response

    def _cut(self, error: Exception, safe: bool) -> None:
        if not safe:
            self.hold.down(f"group restarting (a request was cut: {type(error).__name__})")
            raise UpstreamFailed(
                "the model's group stopped while it answered this request, and sending it again could give "
                "another answer; send it again (set a seed or temperature 0 to have the front repeat it)"
            ) from error
        self.hold.cut(error)

    async def handle(self, request: Request) -> Response:
        await self.start()
        path = request.url.path
        if path in PROBES and not self.hold.ready.is_set():  # a health check is answered, not held
            self.hold.mark(await self.upstream.readiness())  # asked now: the poller may not have looked yet
            if not self.hold.ready.is_set():  # rank 0's own shape, so a client reads it alike
                problems = [f"the front holds requests: {self.hold.why}"]
                headers = {"x-nodewise-front": "1", "Retry-After": "5"}
                return JSONResponse({"ready": False, "problems": problems}, 503, headers=headers)
        body, payload, safe = prepare(path, request.method, await request.body())
        deadline = time.monotonic() + self.config.hold_timeout_s
        try:
            response = await self.send(request, body, safe, deadline)
        except ProtocolError as e:
            return _error(e)
        if payload is not None and payload.get("stream") is True and response.status == 200:
            stream = self.continued(request, response, payload, safe)
            return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            content = await response.read()
        except CUT as e:
            response.close()
            try:
                self._cut(e, safe)
            except ProtocolError as refused:
                return _error(refused)
            return await self.handle_again(request, body, safe, deadline)
        return Response(content, response.status, headers=_answer_headers(response))

    async def handle_again(self, request: Request, body: bytes, safe: bool, deadline: float) -> Response:
        """A whole answer cut midway: send it again (it is safe) until one arrives whole or time runs out."""
        while True:
            try:
                response = await self.send(request, body, safe, deadline)
            except ProtocolError as e:
                return _error(e)
            try:
                content = await response.read()
            except CUT as e:
                response.close()
                self.hold.cut(e)
                continue
            return Response(content, response.status, headers=_answer_headers(response))

    async def continued(
        self, request: Request, response: aiohttp.ClientResponse, payload: dict[str, Any], safe: bool
    ) -> AsyncIterator[bytes]:
        """The client's SSE stream: rank 0's events, and where a restart cut them, the rest from
        the new group (the prompt plus the tokens already sent, as ``input_ids``)."""
        progress = StreamProgress(payload)
        try:
            while True:
                try:
                    async for event in progress.relay(response):
                        yield event
                    return
                except CUT as e:
                    response.close()
                    if not (safe and progress.can_continue(request.url.path)):
                        cut = {"message": "the model's group restarted mid-stream", "code": "BAD_GATEWAY"}
                        yield sse({"error": cut})
                        return
                    self.hold.down(f"group restarting (a stream was cut: {type(e).__name__})")
                self.metrics.continued.inc()
                deadline = time.monotonic() + self.config.hold_timeout_s
                try:
                    response = await self.send(request, progress.rest(), True, deadline)
                except ProtocolError as e:
                    yield sse({"error": {"message": str(e), "code": type(e).code}})
                    return
        finally:  # the client went away, or the stream ended: a connection not read to its end is not reused
            response.release()


_SKIP = frozenset({"host", "content-length", "connection", "transfer-encoding"})
_SKIP_ANSWER = frozenset({"content-length", "connection", "transfer-encoding", "content-encoding"})


def _target(request: Request) -> URL:
    """The request's path and query as the client sent them (percent-encoding kept)."""
    scope = request.scope
    raw = scope.get("raw_path") or scope["path"].encode()
    query = scope.get("query_string", b"")
    return URL((raw + b"?" + query if query else raw).decode("latin-1"), encoded=True)


def _headers(request: Request) -> dict[str, str]:
    return {k: v for k, v in request.headers.items() if k not in _SKIP}  # Starlette's names are lower case


def _answer_headers(response: aiohttp.ClientResponse) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.lower() not in _SKIP_ANSWER}


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
        rest = await front.upstream.metrics()  # nothing while the group is down: the front's own counters answer
        return Response(own + rest, media_type=CONTENT_TYPE)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await front.upstream.stop()  # on shutdown: the clients to rank 0 closed, not left to the interpreter

    methods = ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]
    return Starlette(
        routes=[
            Route("/front", state),
            Route("/metrics", metrics),
            Route("/{path:path}", front.handle, methods=methods),
        ],
        lifespan=lifespan,
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
    parser.add_argument("--record", default=None, help="the group's record: its 'endpoint' is rank 0's address now")
    args = parser.parse_args(argv)
    if args.hold_timeout_s <= 0 or args.max_held < 1:
        print(
            f"nodewise-front error: --hold-timeout-s ({args.hold_timeout_s}) must be > 0 and --max-held "
            f"({args.max_held}) >= 1",
            file=sys.stderr,
        )
        return 2
    config = FrontConfig(args.upstream.rstrip("/"), args.app, args.hold_timeout_s, args.max_held, record=args.record)
    try:
        server = HttpServer(
            build_app(Front(config)), args.host, args.port, HttpLimits(max_connections=1024), lifespan=True
        )
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
