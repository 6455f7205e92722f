"""The HTTP protocol surface of every nodewise endpoint, in one place: the errors a request can
meet, their status and code, the error body, and the JSON encoder.

Used by the Ray Serve app (``serving/app.py``), DeepSpeed's rank 0 (``serving/deepspeed_worker.py``)
and the webhook receiver (``tasks/triggers/webhook_server.py``). Errors are matched by
``isinstance`` (a subclass keeps its parent's status), as KServe's ``errors.py`` and its one
handler table do. Anything that is not a ``ProtocolError`` is a bug: 500 with a request id that
the server logs beside the traceback, never the exception's text.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson


class ProtocolError(Exception):
    """A request the server refuses on purpose; ``status`` and ``code`` say how."""

    status = 400
    code = "BAD_REQUEST"


class BadRequest(ProtocolError, ValueError):
    """A request the client must fix (400)."""


class Unauthorized(ProtocolError):
    """A request without valid credentials or signature (401)."""

    status, code = 401, "UNAUTHORIZED"


class NotFound(ProtocolError, LookupError):
    """No such route (404)."""

    status, code = 404, "ENDPOINT_NOT_FOUND"


class PayloadTooLarge(ProtocolError, ValueError):
    """A body over the configured limit (413)."""

    status, code = 413, "PAYLOAD_TOO_LARGE"


class UnsupportedMediaType(ProtocolError, ValueError):
    """A content type the protocol does not take (415, as ``mlflow models serve`` answers)."""

    status, code = 415, "UNSUPPORTED_MEDIA_TYPE"


class UpstreamFailed(ProtocolError):
    """A service this server passes the request on to did not take it (502; the sender retries)."""

    status, code = 502, "BAD_GATEWAY"


class NotReady(ProtocolError):
    """The model (or a rank) is not ready (503)."""

    status, code = 503, "NOT_READY"

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class RequestTimeout(ProtocolError, TimeoutError):
    """The computation did not finish in time (504)."""

    status, code = 504, "TIMEOUT"


INTERNAL = (500, "INTERNAL_ERROR")


def status_for(error: BaseException) -> tuple[int, str]:
    """(HTTP status, error code) for ``error``; (500, INTERNAL_ERROR) for anything unplanned."""
    if isinstance(error, ProtocolError):
        return error.status, error.code
    return INTERNAL


def error_body(code: str, message: str) -> bytes:
    """The one error body: ``{"error_code": ..., "message": ...}`` (MLflow's scoring server's shape)."""
    return encode_json({"error_code": code, "message": message})


def error_response(error: BaseException, log: Any = None, where: str = "the server log") -> tuple[int, bytes]:
    """(status, body) for ``error``. An unplanned one gets a request id; ``log(request_id, error)``
    records it with its traceback (the body never carries the exception's text, only ``where`` it
    is logged)."""
    status, code = status_for(error)
    if status != 500:
        return status, error_body(code, str(error))
    request_id = uuid.uuid4().hex[:12]
    if log is not None:
        log(request_id, error)
    return status, error_body(code, f"internal error; see {where} for request id {request_id}")


def encode_json(payload: Any) -> bytes:
    """JSON bytes, numpy arrays included (orjson: a float32 logits array ~15x faster than json)."""
    return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
