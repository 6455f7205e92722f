"""The webhook receiver's HTTP side on its real server (uvicorn, on loopback): routes, refusals and
their bodies, the body's limits, uvicorn's own limits, and stopping it from a thread and, as
``nodewise receiver``, by a signal. What a delivery means is tests/unit/test_promotion.py; the whole
path from ``mlflow server`` to Prefect is tests/integration/test_promotion.py."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from nodewise.core.settings import Settings
from serving.http_server import HttpLimits, HttpServer
from tasks.triggers import webhook_server
from tasks.triggers.promotion import sign
from tasks.triggers.webhook_server import MAX_BODY, Receiver, serve

SECRET = "unit-webhook-secret"
NO_PREFECT = "http://127.0.0.1:9/api"  # nothing listens on the discard port: the events are not taken


def alias_body(name: str, alias: str = "champion") -> bytes:
    data = {"name": name, "alias": alias, "version": "3"}
    return json.dumps({"entity": "model_version_alias", "action": "created", "data": data}).encode()


def signed(body: bytes, delivery: str | None = None, secret: str = SECRET) -> dict[str, str]:
    delivery, stamp = delivery or str(uuid.uuid4()), str(int(time.time()))
    return {
        "X-MLflow-Delivery-Id": delivery,
        "X-MLflow-Timestamp": stamp,
        "X-MLflow-Signature": sign(secret, delivery, stamp, body),
        "Content-Type": "application/json",
    }


def start(tmp_path: Path, limits: HttpLimits | None = None) -> HttpServer:
    settings = Settings(state_dir=tmp_path / "state", triggers={"webhook_secret": SECRET})
    server = serve(Receiver(settings, NO_PREFECT, lambda name: name == "known"), "127.0.0.1", 0, limits)
    server.start_in_thread()
    return server


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[str]:
    server = start(tmp_path)
    yield f"http://127.0.0.1:{server.port}"
    server.shutdown()
    server.server_close()


def raw_request(port: int, head: str, body: bytes = b"", half_close: bool = False) -> bytes:
    """Send ``head`` and ``body`` as they are; the whole answer (the server closes the connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
        conn.sendall(head.encode() + b"\r\n" + body)
        if half_close:
            conn.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


def test_routes_and_what_another_route_or_method_is_told(receiver: str) -> None:
    assert httpx.get(f"{receiver}/health").json() == {"status": "ok"}
    assert httpx.get(f"{receiver}/health/").json() == {"status": "ok"}  # a trailing slash, no redirect
    assert "/webhook" in httpx.get(f"{receiver}/openapi.json").json()["paths"]
    for method, path, use in [
        ("GET", "/nope", "use POST /webhook or GET /health"),
        ("GET", "/webhook", "use POST /webhook or GET /health"),
        ("POST", "/health", "use POST /webhook"),
        ("PUT", "/webhook", "use POST /webhook or GET /health"),
    ]:
        answer = httpx.request(method, f"{receiver}{path}")
        assert answer.status_code == 404
        assert answer.headers["content-type"] == "application/json"
        assert answer.json() == {"error_code": "ENDPOINT_NOT_FOUND", "message": f"no route {method} {path}; {use}"}


def test_deliveries_are_refused_ignored_or_not_passed_on_with_the_same_bodies(
    receiver: str, caplog: pytest.LogCaptureFixture
) -> None:
    url, body = f"{receiver}/webhook", alias_body("known")
    forged = httpx.post(url, content=body, headers=signed(body, secret="not-it"))
    assert forged.status_code == 401
    assert forged.json()["error_code"] == "UNAUTHORIZED"
    assert forged.json()["message"].startswith("signature does not match")
    garbage = httpx.post(url, content=b"{not json", headers=signed(b"{not json"))
    assert (garbage.status_code, garbage.json()["error_code"]) == (400, "BAD_REQUEST")
    other = httpx.post(url, content=alias_body("known", "staging"), headers=signed(alias_body("known", "staging")))
    assert other.status_code == 200
    assert other.json()["ignored"].startswith("alias 'staging' is not a watched alias")
    unknown = httpx.post(url, content=alias_body("gone"), headers=signed(alias_body("gone")))
    assert (unknown.status_code, unknown.json()) == (200, {"ignored": "model 'gone' is not in the registry"})
    delivery = str(uuid.uuid4())
    with caplog.at_level(logging.INFO, logger="nodewise.receiver"):
        refused = httpx.post(url, content=body, headers=signed(body, delivery))
        assert refused.status_code == 502  # Prefect did not take the event: MLflow retries ...
        assert refused.json()["error_code"] == "BAD_GATEWAY"
        again = httpx.post(url, content=body, headers=signed(body, delivery))
        assert again.status_code == 502  # ... and the retry is not taken for a replay
    assert f"webhook {delivery} not passed on" in caplog.text
    assert SECRET not in caplog.text


def test_a_body_over_the_limit_is_a_413_whether_announced_or_chunked(receiver: str) -> None:
    url, big = f"{receiver}/webhook", b"x" * (MAX_BODY + 1)
    announced = httpx.post(url, content=big, headers=signed(big))
    assert announced.status_code == 413
    assert announced.json() == {
        "error_code": "PAYLOAD_TOO_LARGE",
        "message": f"body of {MAX_BODY + 1} bytes is over the limit of {MAX_BODY}",
    }
    chunked = httpx.post(url, content=iter([b"x" * 65536] * 17), headers=signed(b""))  # no Content-Length
    assert chunked.status_code == 413
    assert chunked.json()["message"].endswith(f"is over the limit of {MAX_BODY}")
    assert httpx.get(f"{receiver}/health").status_code == 200


def test_a_body_that_stalls_or_is_cut_short_is_a_408_and_every_half_closed_client_is_answered(
    receiver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhook_server, "BODY_TIMEOUT_S", 0.5)
    port = int(receiver.rsplit(":", 1)[1])
    head = "POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n"
    stalled = raw_request(port, head + "Connection: close\r\n", b'{"entity"')
    assert stalled.startswith(b"HTTP/1.1 408 ")
    assert json.loads(stalled.split(b"\r\n\r\n", 1)[1])["error_code"] == "REQUEST_TIMEOUT"
    # a client that half-closes before the body it announced still gets an answer, at once
    monkeypatch.setattr(webhook_server, "BODY_TIMEOUT_S", 60)
    started = time.monotonic()
    cut = raw_request(port, head, b'{"entity"', half_close=True)
    assert cut.startswith(b"HTTP/1.1 408 ")
    assert b"the body has 9 bytes, fewer than its Content-Length of 100" in cut
    assert time.monotonic() - started < 30  # the EOF ended the body, not the 60 s body timeout
    whole = b"{}"
    sent = raw_request(port, f"POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: {len(whole)}\r\n", whole, True)
    assert sent.startswith(b"HTTP/1.1 404 ")  # the whole body, then a half-close: answered too
    assert raw_request(port, "POST /webhook HTTP/1.1\r\nHost: x", half_close=True).startswith(b"HTTP/1.1 400 ")
    assert httpx.get(f"{receiver}/health").status_code == 200


def test_uvicorns_limits_are_the_ones_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A head that grows past ``max_header_bytes`` before it ends is refused by the server; past
    ``max_connections`` open connections (one here, held by a body that has not arrived) a request
    gets 503."""
    monkeypatch.setattr(webhook_server, "BODY_TIMEOUT_S", 30)
    server = start(tmp_path, HttpLimits(max_connections=2, max_header_bytes=4096))
    url = f"http://127.0.0.1:{server.port}"
    try:
        assert httpx.get(f"{url}/health", headers={"X-Big": "y" * 2000}).status_code == 200
        endless = raw_request(server.port, "GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + "y" * 8000)
        assert endless.startswith(b"HTTP/1.1 400 ")
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as held:
            held.sendall(b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            time.sleep(0.2)  # let the server take the held connection before the next one
            assert httpx.get(f"{url}/health").status_code == 503
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/health").status_code != 200:  # the held connection is gone: served again
            assert time.monotonic() < deadline, "still 503 after the held connection closed"
            time.sleep(0.05)
    finally:
        server.shutdown()
        server.server_close()


def test_the_head_bound_counts_only_the_head_and_a_half_close_never_cuts_an_answer_owed(tmp_path: Path) -> None:
    """The bound on a head (4 KiB here) does not count the previous request's body arriving in the
    same read as the next head's first bytes; a half-close after a whole request and part of the
    next one still gets the first one's answer."""
    server = start(tmp_path, HttpLimits(max_header_bytes=4096))
    try:
        body = b"x" * 100_000  # answered 404 at once; its tail arrives with the next head's start
        first = f"POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as conn:
            conn.sendall(first + b"GET /health HTTP/1.1\r\nHo")
            time.sleep(0.3)  # the head's end comes in a read of its own
            conn.sendall(b"st: x\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 404 "), answer[:200]
        assert answer.count(b"HTTP/1.1 200 ") == 1, answer[-300:]  # the second request served, not a 400
        whole = alias_body("known")
        head = f"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: {len(whole)}\r\n"
        signature = "".join(f"{k}: {v}\r\n" for k, v in signed(whole).items())
        cut = raw_request(server.port, head + signature, whole + b"GET /hea", half_close=True)
        assert cut.startswith(b"HTTP/1.1 "), cut[:200]
        assert not cut.startswith(b"HTTP/1.1 400 "), cut[:300]  # the first request's answer, not the cut head's 400
    finally:
        server.shutdown()
        server.server_close()


def test_a_port_in_use_is_an_oserror_and_a_stopped_server_refuses_connections(tmp_path: Path) -> None:
    server = start(tmp_path)
    settings = Settings(state_dir=tmp_path / "other", triggers={"webhook_secret": SECRET})
    with pytest.raises(OSError, match="in use"):  # the CLI words it: pick another --port
        serve(Receiver(settings, NO_PREFECT, lambda name: True), "127.0.0.1", server.port)
    url = f"http://127.0.0.1:{server.port}/health"
    assert httpx.get(url).status_code == 200
    server.shutdown()
    server.server_close()
    with pytest.raises(httpx.ConnectError):
        httpx.get(url, timeout=5)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_nodewise_receiver_serves_until_a_signal_then_says_it_stopped(tmp_path: Path, sig: int) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "NODEWISE_STATE_DIR": str(tmp_path / "state"),
        "NODEWISE_TRIGGERS__WEBHOOK_SECRET": SECRET,
        "NODEWISE_PREFECT__API_URL": NO_PREFECT,
    }
    nodewise = Path(sys.executable).parent / "nodewise"
    command = [str(nodewise), "receiver", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        first = ""  # what it printed up to its banner (MLflow's own lines come first)
        while not (line := proc.stdout.readline()).startswith("receiving MLflow webhooks at"):
            assert line, f"it ended before its banner: {first}"
            first += line
        assert line.startswith(f"receiving MLflow webhooks at http://127.0.0.1:{port}/webhook")
        first += line
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).json() == {"status": "ok"}
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "receiver stopped" in rest
    assert "Traceback" not in rest
    assert proc.returncode == 0
    assert SECRET not in first + rest
