"""Fuzz a live nodewise endpoint from its own OpenAPI document (``GET /openapi.json``) with
schemathesis: schema-valid and schema-violating requests to every operation, plus raw bodies no
schema describes (deep nesting, invalid UTF-8, lies in Content-Length). Shared by the integration
tests (a bounded number of cases) and benchmarks/fuzz.py (thousands)."""

from __future__ import annotations

import contextlib
import json
import socket
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx

Signer = Callable[[bytes], dict[str, str]]

RAW_BODIES = [
    b"[" * 5000 + b"]" * 5000,
    b'{"inputs": ' + b"[" * 200 + b"1" + b"]" * 200 + b"}",
    b'{"inputs": [[1, 2]], "inputs": [[3, 4]]}',
    b'{"inputs": "\xff\xfe\xfd"}',
    b'{"inputs": [[1e999, -1e999, NaN]]}',
    b'{"prompt": "' + b"x" * 100 + b'", "max_new_tokens": 99999999999999999999}',
    b'{"inputs": [[' + b"1," * 5000 + b"1]]}",
    b"\x00" * 64,
    b"",
]


def fuzz_endpoint(
    openapi_url: str,
    max_examples: int,
    sign: Signer | None = None,
    raw_paths: tuple[str, ...] = (),
    planned: tuple[int, ...] = (),
) -> dict[str, Any]:
    """Send generated requests to every operation of the document at ``openapi_url``; return the
    cases sent, the statuses seen and the 5xx answers (with what was sent). ``sign`` adds headers
    computed from the exact body (the receiver's HMAC), so bodies get past the signature check;
    ``planned``: 5xx statuses the caller expects (e.g. 503 while a rank is slow to report)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable

    schema = schemathesis.openapi.from_url(openapi_url)
    base = _origin(openapi_url) + schema.raw_schema.get("servers", [{"url": ""}])[0]["url"].rstrip("/")
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    failing: list[dict[str, Any]] = []

    def send(method: str, path: str, body: bytes | None, headers: dict[str, str], query: Any) -> None:
        if sign is not None and body is not None:
            headers = {**headers, **sign(body)}
        answer = httpx.request(method, base + path, content=body, headers=headers, params=query, timeout=60)
        statuses[answer.status_code] += 1
        if answer.status_code >= 500 and answer.status_code not in planned:
            sent = body[:200] if body else b""
            failures.append(f"{method} {path} {sent!r} -> {answer.status_code} {answer.text[:200]}")
            if len(failing) < 5:  # whole, to replay (the 200-byte excerpt above rarely suffices)
                failing.append({"method": method, "path": path, "headers": headers, "body": (body or b"").hex()})

    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in schemathesis.GenerationMode:
            strategy = operation.as_strategy(generation_mode=mode)

            @settings(max_examples=max_examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            @given(strategy)
            def case_run(case: Any) -> None:
                body, headers = _encode(case)
                headers.update({k: str(v) for k, v in (case.headers or {}).items() if _header_ok(k, v)})
                send(case.method.upper(), case.formatted_path, body, headers, case.query)

            with contextlib.suppress(Unsatisfiable):  # nothing to violate (e.g. a GET with no inputs)
                case_run()
    for path in raw_paths:
        for body in RAW_BODIES:
            send("POST", path, body, {"Content-Type": "application/json"}, None)
        statuses[_lying_content_length(base + path, sign)] += 1
    report = {"cases": sum(statuses.values()), "statuses": dict(sorted(statuses.items())), "server_errors": failures}
    return {**report, "failing_requests": failing}


def _encode(case: Any) -> tuple[bytes | None, dict[str, str]]:
    from schemathesis.core import NotSet

    if isinstance(case.body, NotSet):
        return None, {}
    media = case.media_type or "application/json"
    if isinstance(case.body, bytes):
        return case.body, {"Content-Type": media}
    if media == "text/csv":
        return str(case.body).encode(), {"Content-Type": media}
    return json.dumps(case.body, default=str).encode(), {"Content-Type": media}


def _header_ok(name: str, value: Any) -> bool:
    text = str(value)
    return text.isprintable() and text.isascii() and "\n" not in text and name.lower() != "content-length"


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _lying_content_length(url: str, sign: Signer | None) -> int:
    """Announce 1000 bytes, send 10, wait for the answer (the server must not hang or 500)."""
    parts = urlsplit(url)
    body = b'{"inputs"'
    extra = "".join(f"{k}: {v}\r\n" for k, v in (sign(body) if sign else {}).items())
    head = f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
    request = (head + extra + "Content-Length: 1000\r\nConnection: close\r\n\r\n").encode() + body
    with socket.create_connection((parts.hostname, parts.port), timeout=90) as conn:
        conn.sendall(request)
        conn.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0
