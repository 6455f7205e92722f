"""The HTTP endpoint MLflow's webhooks are sent to (``nodewise receiver``).

``POST /webhook``: the signature is checked (401 if forged or stale), the body parsed (400 if it
is not a webhook payload), a replayed delivery ignored, an event for another alias or an unknown
model logged and ignored (200); a promotion becomes a Prefect event (202). If the Prefect API
does not take it, the answer is 502 and the delivery is forgotten, so MLflow's retry gets
through. ``GET /health``: 200.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from nodewise.core.errors import InvalidInput, NodewiseError, WebhookRejected
from nodewise.core.settings import Settings
from serving.errors import (
    BadRequest,
    NotFound,
    Unauthorized,
    UpstreamFailed,
    encode_json,
    error_response,
    read_body,
)
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


def serve(receiver: Receiver, host: str, port: int) -> ThreadingHTTPServer:
    """An HTTP server for ``receiver`` (not yet serving: call ``serve_forever``)."""

    class Handler(BaseHTTPRequestHandler):
        timeout = 30  # seconds a client may pause while sending (then 408, never a hung thread)

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/health":
                self._answer(200, encode_json({"status": "ok"}))
            elif self.path.rstrip("/") == "/openapi.json":
                self._answer(200, encode_json(document("nodewise webhook receiver", "1", webhook_paths())))
            else:
                self._refuse(NotFound(f"no route GET {self.path}; use POST /webhook or GET /health"))

        def do_POST(self) -> None:
            try:
                if self.path.rstrip("/") != "/webhook":
                    raise NotFound(f"no route POST {self.path}; use POST /webhook")
                body = read_body(self.rfile, self.headers, MAX_BODY)
                status, answer = receiver.handle(dict(self.headers.items()), body)
                self._answer(status, encode_json(answer))
            except Exception as e:  # one place maps every error to a status (serving/errors.py)
                self._refuse(e)

        def _refuse(self, error: Exception) -> None:
            self._answer(*error_response(error, _log_failure, where="the receiver's log"))

        def _answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug(format, *args)

    return ThreadingHTTPServer((host, port), Handler)


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


def start_in_thread(server: ThreadingHTTPServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


def _log_failure(request_id: str, error: Exception) -> None:
    logger.error("webhook request %s failed", request_id, exc_info=error)
