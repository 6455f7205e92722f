"""The HTTP endpoint MLflow's webhooks are sent to (``nodewise receiver``).

``POST /webhook``: the signature is checked (401 if forged or stale), the body parsed (400 if it
is not a webhook payload), a replayed delivery ignored, an event for another alias or an unknown
model logged and ignored (200); a promotion becomes a Prefect event (202). If the Prefect API
does not take it, the answer is 502 and the delivery is forgotten, so MLflow's retry gets
through. ``GET /health``: 200; ``GET /openapi.json``: the routes' OpenAPI document.

It runs on uvicorn (``serving/http_server.py``: keep-alive, the connection and header limits
are its settings); the body's limit (``MAX_BODY``, 413) and time (``BODY_TIMEOUT_S``, 408) are checked by
``serving.errors.receive_body``, with the messages of rank 0's ``read_body``. The receiver's work
blocks, so it runs on Starlette's thread pool, concurrently as before.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from nodewise.core.errors import InvalidInput, NodewiseError, WebhookRejected
from nodewise.core.settings import Settings
from serving.errors import (
    BadRequest,
    NotFound,
    Unauthorized,
    UpstreamFailed,
    encode_json,
    error_response,
    receive_body,
)
from serving.http_server import HttpLimits, HttpServer
from serving.openapi import document, webhook_paths
from tasks.triggers.promotion import (
    SeenDeliveries,
    created_event,
    parse_created,
    parse_promotion,
    post_events,
    promotion_event,
    verify,
)

logger = logging.getLogger("nodewise.receiver")
MAX_BODY = 1024 * 1024
BODY_TIMEOUT_S = 30  # a client that pauses longer while sending its body gets 408 (its connection is freed)


class Receiver:
    """What the endpoint does with one delivery (no HTTP in here: testable as is)."""

    def __init__(self, settings: Settings, api_url: str, known_model: Callable[[str], bool]) -> None:
        if not settings.triggers.webhook_secret:
            raise InvalidInput(
                "the receiver needs the webhook's secret: set NODEWISE_TRIGGERS__WEBHOOK_SECRET to the secret "
                "the MLflow webhook was created with"
            )
        self.secret = settings.triggers.webhook_secret.get_secret_value()
        self.triggers = settings.triggers
        # the alias that deploys a version, and the one that starts its rollout beside the champion
        self.aliases = (settings.triggers.alias, settings.rollout.challenger_alias)
        self.api_url = api_url
        self.known_model = known_model
        self.seen = SeenDeliveries(settings.state.webhook_deliveries, keep_s=2 * settings.triggers.max_age_s)

    def handle(self, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
        """(status, answer) for one delivery; a refusal raises a ``serving.errors.ProtocolError``.

        An alias set on the watched alias announces a promotion; a new version
        (``model_version.created``) announces its creation, so it is profiled before anyone
        promotes it (and, with ``model_version.created`` in ``webhook_events``, a promotion too)."""
        try:
            delivery = verify(headers, body, self.secret, self.triggers.max_age_s)
            promotion = parse_promotion(body, tuple(self.triggers.webhook_events))
        except WebhookRejected as e:
            logger.warning("webhook refused (%s): %s", e.status, e)
            raise (Unauthorized if e.status == 401 else BadRequest)(str(e)) from e
        created = parse_created(body)
        if promotion is None and created is None:
            return 200, {"ignored": "not a promotion event this receiver watches"}
        if promotion is not None and promotion[1] and promotion[1] not in self.aliases:
            if created is None:
                return 200, {"ignored": f"alias {promotion[1]!r} is not a watched alias {list(self.aliases)}"}
            promotion = None
        name, version = (promotion[0], promotion[2]) if promotion is not None else created  # type: ignore[misc]
        if not self.seen.first_time(delivery):
            logger.info("webhook delivery %s seen before: ignored", delivery)
            return 200, {"ignored": f"delivery {delivery} was already taken"}
        if not self.known_model(name):
            logger.warning("webhook for model %r, which the registry does not know: ignored", name)
            return 200, {"ignored": f"model {name!r} is not in the registry"}
        events = [created_event(name, version, "webhook")] if created is not None else []
        if promotion is not None:
            alias = promotion[1] or self.triggers.alias
            events.append(promotion_event(name, alias, version, "webhook", f"delivery:{delivery}"))
        try:
            post_events(self.api_url, events)
        except NodewiseError as e:
            self.seen.forget(delivery)  # let MLflow's retry through
            logger.error("webhook %s not passed on: %s", delivery, e)
            raise UpstreamFailed(str(e)) from e
        for event in events:
            logger.info("%s %s version %s (event %s)", event["event"], name, version, event["id"])
        return 202, {"event": events[-1]["id"], "events": [e["id"] for e in events]}


def build_app(receiver: Receiver) -> Starlette:
    """The receiver's routes as a Starlette app. A trailing slash is taken (no redirect); another
    route or method is a 404 naming the routes there are; every refusal has ``serving/errors.py``'s
    body."""

    async def health(request: Request) -> Response:
        return _answer(200, encode_json({"status": "ok"}))

    async def openapi(request: Request) -> Response:
        return _answer(200, encode_json(document("nodewise webhook receiver", "1", webhook_paths())))

    async def webhook(request: Request) -> Response:
        try:
            body = await receive_body(request, MAX_BODY, BODY_TIMEOUT_S)
            # the receiver's work blocks (a file lock, the registry, the Prefect API): off the event loop
            status, answer = await run_in_threadpool(receiver.handle, dict(request.headers), body)
        except Exception as e:  # one place maps every error to a status (serving/errors.py)
            return _refuse(e)
        return _answer(status, encode_json(answer))

    async def no_route(request: Request, error: Exception) -> Response:
        method, path = request.method, request.url.path
        use = "use POST /webhook" if method == "POST" else "use POST /webhook or GET /health"
        return _refuse(NotFound(f"no route {method} {path}; {use}"))

    table = [("/health", health, "GET"), ("/openapi.json", openapi, "GET"), ("/webhook", webhook, "POST")]
    routes = [Route(p, endpoint, methods=[method]) for path, endpoint, method in table for p in (path, path + "/")]
    return Starlette(routes=routes, exception_handlers={HTTPException: no_route})


def serve(receiver: Receiver, host: str, port: int, limits: HttpLimits | None = None) -> HttpServer:
    """An HTTP server (uvicorn) for ``receiver``, its socket bound (``OSError`` if it cannot be),
    not yet serving: call ``serve_forever`` or ``start_in_thread``."""
    return HttpServer(build_app(receiver), host, port, limits)


def registry_lookup(settings: Settings) -> Callable[[str], bool]:
    """Whether the registry knows a model (MLflow's client, through the configured URIs)."""
    from mlflow.exceptions import MlflowException

    from tasks.planning.registry import make_client

    client = make_client(settings.tracking_uri, settings.registry_uri)

    def known(name: str) -> bool:
        try:
            client.get_registered_model(name)
        except MlflowException:
            return False
        return True

    return known


def start_in_thread(server: HttpServer) -> threading.Thread:
    """Serve on a daemon thread (tests, benchmarks); ``server.shutdown()`` stops it."""
    return server.start_in_thread()


def _answer(status: int, body: bytes) -> Response:
    return Response(body, status_code=status, media_type="application/json")


def _refuse(error: Exception) -> Response:
    return _answer(*error_response(error, _log_failure, where="the receiver's log"))


def _log_failure(request_id: str, error: Exception) -> None:
    logger.error("webhook request %s failed", request_id, exc_info=error)
