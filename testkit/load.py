"""A closed-loop HTTP load client: each worker sends its next request when the last is answered.
Every outcome is kept with its end time and latency (tests count failures; benchmarks make series)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import httpx


@dataclass(frozen=True)
class Outcome:
    """One request: when it ended (``time.time()``), its status code or error name, its latency."""

    at: float
    outcome: str
    latency_s: float
    detail: str = ""
    longest_gap_s: float = 0.0  # streamed: the longest the client waited for its next bytes (the head first)

    @property
    def ok(self) -> bool:
        return self.outcome == "200"


class LoadClient:
    """``workers`` threads, each POSTing ``body`` (JSON) to ``url`` in a loop until stopped.

    Use as a context manager, or ``start()``/``stop()`` (several times: ``log`` keeps growing).
    ``backoff_s`` is a pause after a failed request (no hot spin on a closed port). ``check`` looks
    at each 200's response and names what is wrong with it (a stream cut short, other tokens than
    expected), else None: such an answer counts as failed, its outcome ``"wrong"``. With
    ``stream``, each answer is read as it comes and the longest wait for its next bytes is kept
    (``Outcome.longest_gap_s``): what a streaming client sees of a stall.
    """

    def __init__(
        self,
        url: str,
        body: bytes,
        workers: int = 4,
        timeout_s: float = 30.0,
        backoff_s: float = 0.0,
        check: Callable[[httpx.Response], str | None] | None = None,
        stream: bool = False,
    ) -> None:
        self.url, self.body, self.workers = url, body, workers
        self.timeout_s, self.backoff_s, self.check, self.stream = timeout_s, backoff_s, check, stream
        self.log: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> LoadClient:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._stop.clear()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(self.workers)]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout_s + 5)

    def _run(self) -> None:
        headers = {"Content-Type": "application/json"}
        with httpx.Client(timeout=self.timeout_s) as client:
            while not self._stop.is_set():
                began = time.perf_counter()
                gap = 0.0
                try:
                    if self.stream:
                        r, gap = self._streamed(client, headers, began)
                    else:
                        r = client.post(self.url, content=self.body, headers=headers)
                    outcome, detail = str(r.status_code), ("" if r.status_code == 200 else r.text[:200])
                    if r.status_code == 200 and self.check is not None and (wrong := self.check(r)):
                        outcome, detail = "wrong", wrong[:200]
                except httpx.HTTPError as e:
                    outcome, detail = type(e).__name__, str(e)[:200]
                done = Outcome(time.time(), outcome, time.perf_counter() - began, detail, gap)
                with self._lock:
                    self.log.append(done)
                if not done.ok and self.backoff_s:
                    time.sleep(self.backoff_s)

    def _streamed(self, client: httpx.Client, headers: dict[str, str], began: float) -> tuple[httpx.Response, float]:
        """The answer read as it comes, and the longest wait for its next bytes."""
        with client.stream("POST", self.url, content=self.body, headers=headers) as r:
            last = time.perf_counter()
            gap, chunks = last - began, []
            for chunk in r.iter_raw():
                now = time.perf_counter()
                gap, last = max(gap, now - last), now
                chunks.append(chunk)
        whole = httpx.Response(r.status_code, headers=r.headers, content=b"".join(chunks), request=r.request)
        return whole, gap

    def outcomes_between(self, start: float = 0.0, end: float = float("inf")) -> list[Outcome]:
        """The requests that ended between ``start`` and ``end`` (``time.time()`` values)."""
        with self._lock:
            return [o for o in self.log if start <= o.at <= end]

    def failed_between(self, start: float, end: float) -> tuple[int, int]:
        """(failed, all) requests that ended between ``start`` and ``end``."""
        window = self.outcomes_between(start, end)
        return sum(not o.ok for o in window), len(window)

    @property
    def outcomes(self) -> Counter[str]:
        return Counter(o.outcome for o in self.outcomes_between())

    @property
    def ok(self) -> int:
        return sum(o.ok for o in self.outcomes_between())

    @property
    def failures(self) -> list[str]:
        """Each failed request as one line: its time, status or error, and the start of its answer."""
        return [
            f"{time.strftime('%H:%M:%S', time.localtime(o.at))} {o.outcome} {o.detail}"
            for o in self.outcomes_between()
            if not o.ok
        ]
