"""The shared test helpers (testkit) do what tests and benchmarks rely on."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from testkit import LoadClient, wait_until


class _Flaky(BaseHTTPRequestHandler):
    """Answers 200, except every third request 503."""

    count = 0
    lock = threading.Lock()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        with _Flaky.lock:
            _Flaky.count += 1
            status = 503 if _Flaky.count % 3 == 0 else 200
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/invocations"
    httpd.shutdown()
    httpd.server_close()


def test_the_load_client_keeps_every_outcome_and_restarts(server: str) -> None:
    load = LoadClient(server, b"{}", workers=2)
    with load:
        wait_until(lambda: len(load.log) >= 30, 30, "30 answers", every_s=0.05)
    first = len(load.log)
    assert load.ok + sum(n for o, n in load.outcomes.items() if o != "200") == first
    assert load.outcomes["503"] >= 5
    assert all(line.split()[1] == "503" for line in load.failures)
    failed, total = load.failed_between(load.log[0].at, load.log[-1].at)
    assert (failed, total) == (load.outcomes["503"], first)
    load.start()  # again: the log keeps growing
    wait_until(lambda: len(load.log) >= first + 10, 30, "10 more answers", every_s=0.05)
    load.stop()
    assert all(o.latency_s >= 0 for o in load.log)


def test_a_check_that_finds_a_200_wrong_counts_it_failed(server: str) -> None:
    seen: list[int] = []

    def every_other_is_wrong(response) -> str | None:
        seen.append(response.status_code)
        return "not the expected body" if len(seen) % 2 == 0 else None

    with LoadClient(server, b"{}", workers=1, check=every_other_is_wrong) as load:
        wait_until(lambda: len(load.log) >= 12, 30, "12 answers", every_s=0.05)
    assert set(seen) == {200}  # only 200s are checked
    assert load.outcomes["wrong"] >= 4
    assert all(o.detail == "not the expected body" for o in load.log if o.outcome == "wrong")
    assert load.ok + load.outcomes["wrong"] + load.outcomes["503"] == len(load.log)


def test_a_streamed_client_reads_each_answer_as_it_comes_and_keeps_its_longest_wait(server: str) -> None:
    bodies: list[str] = []

    def body_seen(response) -> str | None:
        bodies.append(response.text)
        return None

    with LoadClient(server, b"{}", workers=1, check=body_seen, stream=True) as load:
        wait_until(lambda: len(load.log) >= 6, 30, "6 answers", every_s=0.05)
    assert set(bodies) == {"{}"}  # the check sees the whole body, as without stream
    assert load.outcomes["503"] >= 1
    assert all(0 < o.longest_gap_s <= o.latency_s for o in load.log)


def test_a_closed_port_is_an_error_name_not_an_exception() -> None:
    with LoadClient("http://127.0.0.1:9/invocations", b"{}", workers=1, timeout_s=2, backoff_s=0.05) as load:
        wait_until(lambda: load.log, 30, "one outcome", every_s=0.05)
    assert load.ok == 0
    assert set(load.outcomes) == {"ConnectError"}


def test_wait_until_returns_the_value_or_says_what_it_saw() -> None:
    calls = iter(range(10))
    assert wait_until(lambda: next(calls) >= 2 and "done", 5, every_s=0.01) == "done"
    with pytest.raises(AssertionError, match=r"the answer: not true after 0 s; last seen: 'nothing'"):
        wait_until(lambda: False, 0.05, "the answer", every_s=0.01, seen=lambda: "nothing")
