"""The HTTP protocol surface of every nodewise endpoint, in one place: the errors a request can
meet, their status and code, the error body, reading a body, and JSON in and out.

Used by the Ray Serve app (``serving/app.py``), DeepSpeed's rank 0 (``serving/deepspeed_worker.py``)
and the webhook receiver (``tasks/triggers/webhook_server.py``). Errors are matched by
``isinstance`` (a subclass keeps its parent's status), as KServe's ``errors.py`` and its one
handler table do. Anything that is not a ``ProtocolError`` is a bug: 500 with a request id that
the server logs beside the traceback, never the exception's text. A ``ProtocolError`` that is a
500 (``GenerationFailed``) keeps its message: it was written for the client.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import orjson

MAX_JSON_DEPTH = 64  # no scoring, generation or webhook body nests deeper; a deeper one is refused


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


class ClientTimeout(ProtocolError):
    """The client sent less than it announced, and stopped (408)."""

    status, code = 408, "REQUEST_TIMEOUT"


class UpstreamFailed(ProtocolError):
    """A service this server passes the request on to did not take it (502; the sender retries)."""

    status, code = 502, "BAD_GATEWAY"


class NotReady(ProtocolError):
    """The model (or a rank) is not ready (503)."""

    status, code = 503, "NOT_READY"

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class GenerationFailed(ProtocolError, RuntimeError):
    """The engine could not finish this request's sequence (500, with the reason: its scores went
    NaN, its forward pass failed); the requests beside it in the batch are answered as usual."""

    status, code = 500, "GENERATION_FAILED"


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
    if isinstance(error, ProtocolError):
        return status, error_body(code, str(error))
    request_id = uuid.uuid4().hex[:12]
    if log is not None:
        log(request_id, error)
    return status, error_body(code, f"internal error; see {where} for request id {request_id}")


def encode_json(payload: Any) -> bytes:
    """JSON bytes, numpy arrays included (orjson: a float32 logits array ~15x faster than json)."""
    return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)


def decode_json(body: bytes) -> Any:
    """Parse a JSON body strictly: BadRequest naming the problem for invalid JSON, non-UTF-8 bytes,
    a key twice in one object, or nesting deeper than ``MAX_JSON_DEPTH``. NaN and Infinity are
    taken, as ``mlflow models serve`` takes them."""
    try:
        value = json.loads(body, object_pairs_hook=_unique_keys)
    except RecursionError as e:
        raise BadRequest(f"JSON nested too deeply; nodewise takes at most {MAX_JSON_DEPTH} levels") from e
    except UnicodeDecodeError as e:
        raise BadRequest(f"body is not UTF-8 ({e.reason} at byte {e.start}); send UTF-8 JSON") from e
    except json.JSONDecodeError as e:
        raise BadRequest(f"body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from e
    if _depth(value) > MAX_JSON_DEPTH:
        raise BadRequest(f"JSON nested too deeply; nodewise takes at most {MAX_JSON_DEPTH} levels")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise BadRequest(f"key {key!r} appears twice in one JSON object; send it once")
        found[key] = value
    return found


def _depth(value: Any, level: int = 0) -> int:
    """How many containers nest in ``value`` (``[[1]]``: 2), looking no deeper than
    ``MAX_JSON_DEPTH + 1``, into every value of an object and the first and last element of a list
    (scoring bodies are rectangular). Each node is visited at most once: the walk is bounded by the
    body's size."""
    if level > MAX_JSON_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level + 1)
    if isinstance(value, list):
        if not value:
            return level + 1
        first = _depth(value[0], level + 1)
        return first if len(value) == 1 else max(first, _depth(value[-1], level + 1))
    return level


def read_body(rfile: Any, headers: Any, limit: int) -> bytes:
    """The body of a request to a ``BaseHTTPRequestHandler``: its Content-Length checked (a number,
    not negative, at most ``limit``: else 400 or 413), then exactly that many bytes (408 when the
    client sends fewer and stops; the handler's ``timeout`` bounds the wait)."""
    raw = headers.get("Content-Length")
    if raw is None:
        return b""
    try:
        length = int(raw)
    except ValueError:
        raise BadRequest(f"Content-Length {raw!r} is not a number of bytes") from None
    if length < 0:
        raise BadRequest(f"Content-Length {length} is negative")
    if length > limit:
        raise PayloadTooLarge(f"body of {length} bytes is over the limit of {limit}")
    try:
        body = rfile.read(length)
    except TimeoutError as e:
        raise ClientTimeout(f"the body stopped before its Content-Length of {length} bytes") from e
    if len(body) < length:
        raise ClientTimeout(f"the body has {len(body)} bytes, fewer than its Content-Length of {length}")
    return body


async def receive_body(request: Any, limit: int, timeout_s: float) -> bytes:
    """The body of a Starlette ``request``, with ``read_body``'s checks and messages: a
    Content-Length over ``limit`` is a 413 before anything is read, and so is a body (chunked
    included) that grows past it; a body that stalls for ``timeout_s`` in all is a 408, and so is a
    client that leaves before its Content-Length (uvicorn already refuses a Content-Length that is
    not a number: 400)."""
    import asyncio

    from starlette.requests import ClientDisconnect

    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body of {int(declared)} bytes is over the limit of {limit}")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"body of {size} bytes so far is over the limit of {limit}")
                chunks.append(chunk)
    except TimeoutError as e:
        raise ClientTimeout(f"the body did not arrive within {timeout_s:.0f} s ({size} bytes came)") from e
    except ClientDisconnect as e:
        raise ClientTimeout(f"the client left after {size} bytes of its body") from e
    if declared is not None and declared.isdigit() and size < int(declared):  # it half-closed early
        raise ClientTimeout(f"the body has {size} bytes, fewer than its Content-Length of {declared}")
    return b"".join(chunks)
