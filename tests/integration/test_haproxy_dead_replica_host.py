"""A replica's host that leaves the network mid-request: HAProxy, as nodewise's launcher configures
it (tasks/rayserve/cluster.py, DEAD_PEER_S), finds it dead and sends the request to another replica.

Two namespace hosts (testkit/hosts.py) each run a small HTTP server in the place of a Serve
replica; HAProxy (the one ray[serve] ships) runs on this machine with a config shaped as Serve
writes it (a trimmed copy: its defaults, `option redispatch 1`, the `retry-on` nodewise asks Serve
for, one model backend with `http-reuse always`), edited by the launcher. The host is cut from the
network (no reset reaches HAProxy) in the two states a request can be in:
- taken: the replica acknowledged it and works on it (TCP keepalive finds the silent peer);
- not yet sent: HAProxy writes it to a pooled connection after the cut (TCP_USER_TIMEOUT does).
Without those options both requests waited for the client's timeout (measured: 40 s of 40 s).
"""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from nodewise.core.runtime import serve_environment
from nodewise.core.settings import Settings
from tasks.rayserve.cluster import write_haproxy_launcher
from testkit import hosts as netns
from testkit import wait_until

from .conftest import free_port_block

pytestmark = pytest.mark.multihost

REPLICA = r"""
import sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

name, delay = sys.argv[1], float(sys.argv[2])

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # HAProxy's health check
        self.answer(b"ok")

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        time.sleep(delay)
        self.answer(name.encode())

    def answer(self, body):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("0.0.0.0", 9000), Handler).serve_forever()
"""


def serve_like_config(port: int, servers: list[str], retry_on: str) -> str:
    """The parts of Serve's HAProxy config this case needs (see tests/fixtures/haproxy/serve.cfg)."""
    lines = "\n".join(f"    server SERVE_REPLICA_{i} {address}:9000 check" for i, address in enumerate(servers))
    return (
        textwrap.dedent(
            """\
        global
            maxconn 200
        defaults
            mode http
            timeout connect 5s
            timeout client 3600s
            timeout server 3600s
            option redispatch 1
            retry-on {retry_on}
            retries 2
        frontend http_frontend
            bind 127.0.0.1:{port}
            acl is_http-a path_beg /a/
            use_backend http-a if is_http-a
            default_backend default_backend
        backend default_backend
            http-request return status 404
        backend http-a
            http-reuse always
            option httpchk GET /-/healthz
            http-check expect status 200
            default-server fastinter 250ms downinter 250ms fall 2 rise 2 inter 5s check
        """
        ).format(port=port, retry_on=retry_on)
        + lines
        + "\n"
    )


class Setup:
    def __init__(self, lan: netns.Hosts, tmp: Path) -> None:
        self.lan, self.tmp = lan, tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self.port = free_port_block(1)
        self.url = f"http://127.0.0.1:{self.port}/a/predict"

    def start(self, delays: tuple[float, float]) -> None:
        script = self.tmp / "replica.py"
        script.write_text(REPLICA)
        for host, name, delay in zip(self.lan.hosts, "AB", delays, strict=True):
            self.procs.append(host.popen([sys.executable, str(script), name, str(delay)]))
        settings = Settings(state_dir=self.tmp / "state")
        launcher = write_haproxy_launcher(settings)
        assert launcher is not None
        cfg = self.tmp / "haproxy.cfg"
        retry_on = serve_environment(settings)["RAY_SERVE_HAPROXY_RETRY_ON"]
        cfg.write_text(serve_like_config(self.port, self.lan.addresses, retry_on))
        with open(self.tmp / "haproxy.log", "wb") as log:
            self.procs.append(subprocess.Popen([str(launcher), "-f", str(cfg), "-db"], stdout=log, stderr=log))
        wait_until(self._both_up, 30, "HAProxy and both replicas answering", every_s=0.2)
        assert "tcp-ut" in cfg.read_text()  # the launcher edited it before HAProxy read it

    def _both_up(self) -> bool:
        try:
            seen = {httpx.post(self.url, content=b"{}", timeout=10).text for _ in range(4)}
        except httpx.HTTPError:
            return False
        return seen == {"A", "B"}

    def two_at_once(self) -> list[tuple[str, str]]:
        """Two requests sent together (round robin: one to each replica): (status or error, body)."""

        def one(_: int) -> tuple[str, str]:
            try:
                answer = httpx.post(self.url, content=b"{}", timeout=30)
                return str(answer.status_code), answer.text
            except httpx.HTTPError as e:
                return type(e).__name__, ""

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            return list(pool.map(one, range(2)))

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    if not netns.available():
        pytest.skip(netns.why_unavailable())
    with netns.hosts(2) as lan:
        made = Setup(lan, tmp_path)
        try:
            yield made
        finally:
            made.stop()


def test_a_request_the_lost_host_was_working_on_is_answered_by_the_other_replica(setup: Setup) -> None:
    setup.start(delays=(3.0, 0.0))  # A takes 3 s to answer: it still works on it when cut
    cut = threading.Timer(1.0, lambda: setup.lan.kill_host(setup.lan[0]))
    cut.start()
    answers = setup.two_at_once()
    cut.join()
    assert sorted(answers) == [("200", "B"), ("200", "B")], answers


def test_a_request_sent_on_a_pooled_connection_to_the_lost_host_is_answered_by_the_other(setup: Setup) -> None:
    setup.start(delays=(0.0, 1.0))  # HAProxy holds idle connections to both (http-reuse always)
    setup.lan.cut(setup.lan[0])  # no reset: the pooled connection to A looks alive
    answers = setup.two_at_once()
    assert sorted(answers) == [("200", "B"), ("200", "B")], answers
