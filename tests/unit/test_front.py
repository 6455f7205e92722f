"""The DeepSpeed front (serving/front.py) against a real upstream: a small Starlette app on uvicorn
on a loopback port, stopped and started again as a group restart would, and the front itself on
uvicorn, called over real HTTP."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from nodewise.core.procs import free_port_block
from nodewise.core.settings import Settings
from serving.front import Front, FrontConfig, build_app, prepare
from serving.http_server import HttpLimits, HttpServer
from tasks.mpi.front import FrontProcess
from tasks.mpi.front_counts import front_report, grown
from testkit import wait_until

NEXT = 7  # the upstream's "model": each token is (previous * NEXT + 3) % 100, greedy and repeatable


class Upstream:
    """A stand-in for rank 0 on a fixed port: /health, /invocations, a streamed /generate that can
    be told to die after some tokens, and /echo; ``stop()`` and ``start()`` as a restart does."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.port = port
        self.host = host
        self.server: HttpServer | None = None
        self.cut_after: int | None = None  # the next stream dies after this many tokens
        self.seen: list[dict[str, Any]] = []
        self.unavailable: list[bytes] = []  # 503 bodies /invocations answers first, one per request
        self.token_s = 0.0  # a pause before each streamed token (a stream under way for a while)

    def app(self) -> Starlette:
        async def health(request: Request) -> JSONResponse:
            return JSONResponse({"ready": True, "problems": []})

        async def invocations(request: Request) -> Response:
            if self.unavailable:
                return Response(self.unavailable.pop(0), 503)
            return JSONResponse({"predictions": (await request.json())["inputs"]})

        async def generate(request: Request) -> Any:
            payload = await request.json()
            self.seen.append(payload)
            return StreamingResponse(self._tokens(payload), media_type="text/event-stream")

        async def custom(request: Request) -> Any:
            return StreamingResponse(self._dying(), media_type="application/json")

        routes = [Route("/health", health), Route("/invocations", invocations, methods=["POST"])]
        routes += [Route("/generate", generate, methods=["POST"]), Route("/custom", custom, methods=["POST"])]
        return Starlette(routes=routes)

    async def _tokens(self, payload: dict[str, Any]) -> Any:
        ids = payload["input_ids"][0]
        cut, self.cut_after = self.cut_after, None
        token = ids[-1]
        for i in range(payload["max_new_tokens"]):
            if cut is not None and i == cut:
                raise RuntimeError("the group died")  # uvicorn drops the connection mid-stream
            token = (token * NEXT + 3) % 100
            if self.token_s:
                await asyncio.sleep(self.token_s)
            yield f"data: {json.dumps({'token_id': token, 'text': f' t{token}'})}\n\n".encode()
        usage = {"prompt_tokens": len(ids), "completion_tokens": payload["max_new_tokens"]}
        yield f"data: {json.dumps({'finish_reason': 'length', 'usage': usage})}\n\n".encode()
        yield b"data: [DONE]\n\n"

    async def _dying(self) -> Any:
        yield b'{"partial": '
        raise RuntimeError("the group died")

    def start(self) -> None:
        self.server = HttpServer(self.app(), self.host, self.port, HttpLimits(graceful_s=1))
        self.server.start_in_thread()

    def stop(self) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    up = Upstream(free_port_block(1))
    up.start()
    yield up
    up.stop()


def _front(upstream: Upstream, **config: Any) -> tuple[str, Front, HttpServer]:
    front = Front(FrontConfig(f"http://127.0.0.1:{upstream.port}", app="t", poll_s=0.05, **config))
    server = HttpServer(build_app(front), "127.0.0.1", 0, lifespan=True)
    server.start_in_thread()
    return f"http://127.0.0.1:{server.port}", front, server


@pytest.fixture
def front(upstream: Upstream, request: pytest.FixtureRequest) -> Iterator[tuple[str, Front]]:
    url, front, server = _front(upstream, **getattr(request, "param", {}))
    yield url, front
    server.shutdown()


def _stream(url: str, ids: list[int], n: int) -> tuple[list[int], list[dict[str, Any]]]:
    tokens, chunks = [], []
    body = {"input_ids": [ids], "max_new_tokens": n, "stream": True}
    with httpx.stream("POST", f"{url}/generate", json=body, timeout=30) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line.removeprefix("data: "))
                chunks.append(chunk)
                tokens += [chunk["token_id"]] if "token_id" in chunk else []
    return tokens, chunks


def _counter(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_request_is_passed_on_and_the_front_says_it_is_ready(front: tuple[str, Front]) -> None:
    url, _ = front
    answer = httpx.post(f"{url}/invocations", json={"inputs": [[1, 2]]}, timeout=10)
    assert (answer.status_code, answer.json()) == (200, {"predictions": [[1, 2]]})
    state = httpx.get(f"{url}/front", timeout=5).json()
    assert (state["ready"], state["held"]) == (True, 0)


def test_requests_wait_while_the_upstream_is_down_and_go_on_when_it_is_back(
    upstream: Upstream, front: tuple[str, Front]
) -> None:
    url, _ = front
    httpx.post(f"{url}/invocations", json={"inputs": [[0]]}, timeout=10)
    upstream.stop()
    answers: list[httpx.Response] = []
    client = threading.Thread(
        target=lambda: answers.append(httpx.post(f"{url}/invocations", json={"inputs": [[3]]}, timeout=30))
    )
    started = time.monotonic()
    client.start()
    time.sleep(1.0)
    state = httpx.get(f"{url}/front", timeout=5).json()
    assert (state["ready"], state["held"]) == (False, 1)
    assert state["why"].startswith("group restarting")
    assert state["down_for_s"] >= 0.5
    upstream.start()
    client.join(30)
    assert answers[0].status_code == 200
    assert answers[0].json() == {"predictions": [[3]]}
    assert time.monotonic() - started >= 1.0
    assert _counter(url, "nodewise_front_holds_total") == 1
    counts = httpx.get(f"{url}/front", timeout=5).json()["counts"]
    assert (counts["held"], counts["continued"], counts["refused"]) == (1, 0, 0)  # retried: a stale connection may


@pytest.mark.parametrize("front", [{"hold_timeout_s": 0.5}], indirect=True)
def test_a_request_held_past_the_timeout_is_a_503_with_retry_after(
    upstream: Upstream, front: tuple[str, Front]
) -> None:
    url, _ = front
    upstream.stop()
    answer = httpx.post(f"{url}/invocations", json={"inputs": [[3]]}, timeout=30)
    upstream.start()
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "5"
    assert answer.json()["error_code"] == "NOT_READY"
    assert "not ready within 0.5 s" in answer.json()["message"]
    assert _counter(url, "nodewise_front_hold_timeouts_total") == 1
    assert httpx.get(f"{url}/front", timeout=5).json()["counts"]["refused"] == 1


def test_a_health_check_while_the_front_holds_asks_rank_0_now_and_keeps_rank_0s_shape(upstream: Upstream) -> None:
    """/health during a hold: rank 0's shape (ready, problems) with 503 while the group is down, and
    rank 0's own ready answer as soon as it is back, without waiting for the poller (which here
    would not look for 30 s): the watchdog's "every rank ready" and the front agree at once."""
    front = Front(FrontConfig(f"http://127.0.0.1:{upstream.port}", app="t", poll_s=30, hold_timeout_s=0.5))
    server = HttpServer(build_app(front), "127.0.0.1", 0, lifespan=True)
    server.start_in_thread()
    url = f"http://127.0.0.1:{server.port}"
    try:
        assert httpx.get(f"{url}/health", timeout=10).json() == {"ready": True, "problems": []}
        upstream.stop()
        assert httpx.post(f"{url}/invocations", json={"inputs": [[1]]}, timeout=30).status_code == 503  # held, expired
        down = httpx.get(f"{url}/health", timeout=10)
        assert (down.status_code, down.headers["retry-after"], down.json()["ready"]) == (503, "5", False)
        [problem] = down.json()["problems"]
        assert problem.startswith("the front holds requests: group restarting")
        upstream.start()
        back = httpx.get(f"{url}/health", timeout=10)
        assert (back.status_code, back.json()) == (200, {"ready": True, "problems": []})
        assert httpx.get(f"{url}/front", timeout=5).json()["ready"] is True
    finally:
        server.shutdown()


@pytest.mark.parametrize("front", [{"hold_timeout_s": 30.0, "max_held": 1}], indirect=True)
def test_a_full_hold_answers_503_at_once(upstream: Upstream, front: tuple[str, Front]) -> None:
    url, _ = front
    upstream.stop()
    first = threading.Thread(target=lambda: httpx.post(f"{url}/invocations", json={"inputs": [[1]]}, timeout=60))
    first.start()
    time.sleep(0.5)
    started = time.monotonic()
    answer = httpx.post(f"{url}/invocations", json={"inputs": [[2]]}, timeout=60)
    assert answer.status_code == 503
    assert time.monotonic() - started < 15  # refused at once, not held for the 30 s hold timeout
    assert "already holds 1 requests" in answer.json()["message"]
    upstream.start()  # the held request goes on
    first.join(60)


def test_a_sampled_generation_without_a_seed_gets_one_and_others_are_left_as_they_are() -> None:
    body, payload, safe = prepare("/generate", "POST", json.dumps({"prompt": "a", "temperature": 0.8}).encode())
    assert safe
    assert isinstance(payload["seed"], int)
    assert json.loads(body)["seed"] == payload["seed"]
    body, payload, safe = prepare("/generate", "POST", b'{"prompt": "a"}')  # greedy: /generate's default
    assert safe
    assert "seed" not in json.loads(body)
    body, _, safe = prepare("/v1/completions", "POST", b'{"prompt": "a", "seed": 5}')
    assert safe
    assert json.loads(body)["seed"] == 5
    _, payload, _ = prepare("/v1/completions", "POST", b'{"prompt": "a"}')  # nodewise's default is greedy
    assert "seed" not in payload
    _, payload, _ = prepare("/v1/chat/completions", "POST", b'{"messages": [], "temperature": 1, "top_k": 1}')
    assert "seed" not in payload  # top_k 1 is greedy whatever the temperature (protocol.is_sampled)
    _, payload, _ = prepare("/v1/completions", "POST", b'{"prompt": "a", "temperature": 1e-6}')
    assert "seed" not in payload  # below protocol.GREEDY_BELOW
    _, payload, _ = prepare("/v1/completions", "POST", b'{"prompt": "a", "temperature": 0.7, "top_k": 40}')
    assert isinstance(payload["seed"], int)
    assert prepare("/custom", "POST", b"{}")[2] is False
    deep = b"[" * 100_000 + b"]" * 100_000  # past json's recursion limit: passed on as it is, rank 0's 400
    assert prepare("/generate", "POST", deep) == (deep, None, False)
    assert prepare("/invocations", "POST", b"{}")[2] is True


def test_a_stream_cut_midway_goes_on_with_the_same_tokens(upstream: Upstream, front: tuple[str, Front]) -> None:
    url, _ = front
    undisturbed, _ = _stream(url, [5, 9], 8)
    upstream.cut_after = 3
    upstream.seen.clear()
    continued, chunks = _stream(url, [5, 9], 8)
    assert continued == undisturbed
    assert upstream.seen[1]["input_ids"] == [[5, 9, *undisturbed[:3]]]  # the prompt plus what was sent
    assert upstream.seen[1]["max_new_tokens"] == 5
    assert chunks[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 8}
    assert _counter(url, "nodewise_front_streams_continued_total") == 1


def test_a_request_not_safe_to_repeat_ends_with_a_502(front: tuple[str, Front]) -> None:
    url, _ = front
    answer = httpx.post(f"{url}/custom", json={}, timeout=30)
    assert answer.status_code == 502
    assert answer.json()["error_code"] == "BAD_GATEWAY"
    assert "could give another answer" in answer.json()["message"]


def test_rank_0_not_ready_is_sent_again_and_rank_0_busy_is_passed_on(
    upstream: Upstream, front: tuple[str, Front]
) -> None:
    url, _ = front
    upstream.unavailable = [b'{"error_code": "NOT_READY", "message": "rank 1: loading"}']
    answer = httpx.post(f"{url}/invocations", json={"inputs": [[4]]}, timeout=10)
    assert (answer.status_code, answer.json()) == (200, {"predictions": [[4]]})  # held, then sent again
    assert _counter(url, "nodewise_front_retries_total") == 1
    upstream.unavailable = [b"Service Unavailable"]  # uvicorn past its connection limit: not a restart
    answer = httpx.post(f"{url}/invocations", json={"inputs": [[4]]}, timeout=10)
    assert (answer.status_code, answer.text) == (503, "Service Unavailable")
    assert httpx.get(f"{url}/front", timeout=5).json()["ready"] is True
    assert _counter(url, "nodewise_front_retries_total") == 1


def test_a_restart_that_moves_rank_0_to_another_host_is_followed_from_the_groups_record(tmp_path: Any) -> None:
    old = Upstream(free_port_block(1))
    old.start()
    record = tmp_path / "cluster.json"  # the group's record, as tasks/mpi/launcher.py writes it
    record.write_text(json.dumps({"endpoint": f"http://127.0.0.1:{old.port}", "hosts": ["a", "b"]}))
    front = Front(FrontConfig(f"http://127.0.0.1:{old.port}", app="t", poll_s=0.05, record=str(record)))
    server = HttpServer(build_app(front), "127.0.0.1", 0, lifespan=True)
    server.start_in_thread()
    url = f"http://127.0.0.1:{server.port}"
    moved = Upstream(old.port, host="127.0.0.2")  # rank 0's port is kept; its host is the spare's
    try:
        assert httpx.post(f"{url}/invocations", json={"inputs": [[1]]}, timeout=10).status_code == 200
        old.stop()  # the group dies; the watchdog relaunches it with rank 0 on another host
        answers: list[httpx.Response] = []
        client = threading.Thread(
            target=lambda: answers.append(httpx.post(f"{url}/invocations", json={"inputs": [[6]]}, timeout=30))
        )
        client.start()
        time.sleep(0.5)
        assert httpx.get(f"{url}/front", timeout=5).json()["held"] == 1
        moved.start()
        record.write_text(json.dumps({"endpoint": f"http://127.0.0.2:{old.port}", "hosts": ["c", "b"]}))
        client.join(30)
        assert (answers[0].status_code, answers[0].json()) == (200, {"predictions": [[6]]})  # held, then sent there
        state = httpx.get(f"{url}/front", timeout=5).json()
        assert (state["upstream"], state["ready"]) == (f"http://127.0.0.2:{old.port}", True)
        assert httpx.post(f"{url}/invocations", json={"inputs": [[7]]}, timeout=10).json() == {"predictions": [[7]]}
        record.unlink()  # a stop removes the record: the front keeps the last address it had
        time.sleep(0.2)
        assert httpx.get(f"{url}/front", timeout=5).json()["upstream"] == f"http://127.0.0.2:{old.port}"
    finally:
        server.shutdown()
        moved.stop()


def test_the_watchdog_reports_what_the_front_held_since_its_last_pass(
    upstream: Upstream, front: tuple[str, Front], tmp_path: Path
) -> None:
    """tasks/mpi/front_counts.py against this real front, found through its record as the watchdog finds it."""
    url, _ = front
    settings = Settings(state_dir=tmp_path)
    folder = settings.state.deepspeed_job("t")
    folder.mkdir(parents=True)
    port = int(url.rsplit(":", 1)[1])
    record = FrontProcess(app_name="t", pid=0, host="127.0.0.1", port=port, upstream="", endpoint=url, log_path="")
    (folder / "front.json").write_text(record.model_dump_json())
    seen, fields = front_report(settings, "t", {})
    assert (seen, fields) == ({"held": 0, "retried": 0, "continued": 0, "refused": 0}, {})  # nothing to report
    upstream.stop()
    answers: list[httpx.Response] = []
    client = threading.Thread(
        target=lambda: answers.append(httpx.post(f"{url}/invocations", json={"inputs": [[3]]}, timeout=30))
    )
    client.start()
    wait_until(lambda: httpx.get(f"{url}/front", timeout=5).json()["held"] == 1, 10, "the request held")
    seen, fields = front_report(settings, "t", seen)
    counts = fields["counts"]
    assert (counts["held"], counts["continued"], counts["refused"]) == (1, 0, 0)
    assert fields["cause"].startswith("the front held 1 requests, sent ")
    assert "holding now: group restarting" in fields["cause"]
    upstream.start()
    client.join(30)
    assert answers[0].status_code == 200
    assert front_report(settings, "t", seen) == (seen, {})  # reported once
    assert grown({"held": 2, "retried": 0, "continued": 0, "refused": 0}, seen)["held"] == 2  # a new front: from 0
    (folder / "front.json").unlink()
    assert front_report(settings, "t", seen) == (seen, {})  # no front: nothing said, nothing forgotten


def test_a_switch_to_a_group_already_ready_lets_a_stream_under_way_finish_on_the_old_one(tmp_path: Any) -> None:
    old = Upstream(free_port_block(1))
    old.start()
    new = Upstream(free_port_block(1))
    new.start()
    old.token_s = 0.05  # 40 tokens: 2 s under way
    record = tmp_path / "cluster.json"
    record.write_text(json.dumps({"endpoint": f"http://127.0.0.1:{old.port}"}))
    front = Front(FrontConfig(f"http://127.0.0.1:{old.port}", app="t", poll_s=0.05, record=str(record)))
    server = HttpServer(build_app(front), "127.0.0.1", 0, lifespan=True)
    server.start_in_thread()
    url = f"http://127.0.0.1:{server.port}"
    streams: list[list[int]] = []
    try:
        reader = threading.Thread(target=lambda: streams.append(_stream(url, [1], 40)[0]))
        reader.start()
        time.sleep(0.3)
        record.write_text(json.dumps({"endpoint": f"http://127.0.0.1:{new.port}"}))  # an upgrade's switch
        deadline = time.monotonic() + 5
        while httpx.get(f"{url}/front", timeout=5).json()["upstream"] != f"http://127.0.0.1:{new.port}":
            assert time.monotonic() < deadline, "the front did not follow the record"
            time.sleep(0.05)
        assert reader.is_alive()  # the switch came while the stream was under way
        assert _stream(url, [2], 3)[0] == [17, 22, 57]  # a new request goes to the new group
        reader.join(30)
        token, expected = 1, []
        for _ in range(40):
            token = (token * NEXT + 3) % 100
            expected.append(token)
        assert streams == [expected]
        assert (len(old.seen), len(new.seen)) == (1, 1)  # each request sent once, where it started
        assert _counter(url, "nodewise_front_streams_continued_total") == 0
        assert _counter(url, "nodewise_front_retries_total") == 0
    finally:
        server.shutdown()
        old.stop()
        new.stop()
