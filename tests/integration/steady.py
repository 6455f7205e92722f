"""A steady closed-loop client for upgrade and fault tests: every outcome is kept."""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx


class SteadyClient:
    """``workers`` threads, each POSTing ``body`` to ``url`` in a loop until stopped."""

    def __init__(self, url: str, body: bytes, workers: int = 4, timeout_s: float = 30.0) -> None:
        self.url, self.body, self.timeout_s = url, body, timeout_s
        self.outcomes: Counter[str] = Counter()
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]

    def __enter__(self) -> SteadyClient:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout_s + 5)

    def _run(self) -> None:
        with httpx.Client(timeout=self.timeout_s) as client:
            while not self._stop.is_set():
                try:
                    r = client.post(self.url, content=self.body, headers={"Content-Type": "application/json"})
                    outcome = str(r.status_code)
                    detail = r.text[:200]
                except httpx.HTTPError as e:
                    outcome, detail = type(e).__name__, str(e)[:200]
                with self._lock:
                    self.outcomes[outcome] += 1
                    if outcome != "200":
                        self.failures.append(f"{time.strftime('%H:%M:%S')} {outcome} {detail}")

    @property
    def ok(self) -> int:
        return self.outcomes["200"]
