"""Each rank's heartbeat and rank 0's picture of all ranks.

``RankState`` is what a rank reports about itself (its start-up phase, steps, time in the current
step); ``heartbeats`` posts it to rank 0 every ``heartbeat_s`` (rank 0 records its own directly);
``ClusterView`` is rank 0's record of every rank's last beat and its verdict (``health``): a dead
rank (no heartbeat) and a hung one (no step) are both problems, and ``/ping`` is 200 only with none.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from serving.errors import BadRequest
from serving.spec import DeepSpeedSpec


@dataclass
class Beat:
    """One rank's last heartbeat, as rank 0 keeps it."""

    rank: int
    pid: int
    host: str  # the rank's address on the route to rank 0: hosts that share a name still differ
    state: str
    steps: int
    step_age_s: float
    rss_bytes: int
    hostname: str = ""
    error: str | None = None
    phases: dict[str, float] = field(default_factory=dict)
    received: float = field(default_factory=time.monotonic)


class RankState:
    """What this rank reports about itself."""

    def __init__(self, rank: int, address: str) -> None:
        self.rank = rank
        self.address = address
        self.state = "starting"
        self.error: str | None = None
        self.steps = 0
        self.last_step = time.monotonic()
        self.busy_since: float | None = None
        self.phases: dict[str, float] = {}  # seconds each start-up phase took
        self._mark = time.monotonic()
        self.changed = threading.Event()  # a new state is reported at once, not at the next beat

    def enter(self, state: str) -> None:
        """Move to ``state``, timing the phase just finished."""
        now = time.monotonic()
        self.phases[self.state] = round(now - self._mark, 2)
        self.state, self._mark = state, now
        self.changed.set()

    def beat(self) -> dict[str, Any]:
        import psutil

        # A rank idle between ticks has an age up to tick_s; one stuck in a step grows without bound.
        since = self.busy_since or self.last_step
        return {
            "rank": self.rank,
            "pid": os.getpid(),
            "host": self.address,
            "hostname": socket.gethostname(),
            "state": self.state,
            "steps": self.steps,
            "step_age_s": round(time.monotonic() - since, 3),
            "rss_bytes": psutil.Process().memory_info().rss,
            "error": self.error,
            "phases": self.phases,
        }


class ClusterView:
    """Rank 0's picture of all ranks, from their heartbeats."""

    def __init__(self, spec: DeepSpeedSpec, world_size: int) -> None:
        self.spec = spec
        self.world_size = world_size
        self.beats: dict[int, Beat] = {}
        self.lock = threading.Lock()
        self.started = time.monotonic()
        # the batch as of the last step, and how many sequences ended by reason (length, stop, cancelled)
        self.engine: dict[str, int] = {"running": 0, "waiting": 0}

    def record(self, beat: dict[str, Any]) -> None:
        rank = int(beat["rank"])
        if not 0 <= rank < self.world_size:
            raise BadRequest(f"heartbeat from rank {rank}, outside 0-{self.world_size - 1}")
        with self.lock:
            self.beats[rank] = Beat(**{k: beat[k] for k in Beat.__dataclass_fields__ if k in beat})

    def health(self) -> dict[str, Any]:
        now = time.monotonic()
        stall = self.spec.tick_s + self.spec.request_timeout_s
        ranks, problems = [], []
        with self.lock:
            beats = dict(self.beats)
        for rank in range(self.world_size):
            beat = beats.get(rank)
            if beat is None:
                ranks.append({"rank": rank, "state": "no heartbeat"})
                problems.append(f"rank {rank}: no heartbeat yet")
                continue
            age = now - beat.received
            row = {**asdict(beat), "heartbeat_age_s": round(age, 3)}
            row.pop("received")
            ranks.append(row)
            if age > self.spec.heartbeat_timeout_s:
                problems.append(f"rank {rank} ({beat.host} pid {beat.pid}): no heartbeat for {age:.1f} s")
            elif beat.state != "ready":
                problems.append(f"rank {rank}: {beat.state}" + (f" ({beat.error})" if beat.error else ""))
            elif beat.step_age_s > stall:
                problems.append(f"rank {rank}: stuck in step {beat.steps + 1} for {beat.step_age_s:.1f} s")
        return {
            "ready": not problems,
            "world_size": self.world_size,
            "problems": problems,
            "ranks": ranks,
            "engine": dict(self.engine),
            "uptime_s": round(now - self.started, 1),
        }


def heartbeats(state: RankState, url: str, every_s: float, local: ClusterView | None) -> None:
    """Post this rank's heartbeat to rank 0 (rank 0 records its own directly)."""
    import httpx

    with httpx.Client(timeout=max(1.0, every_s)) as client:
        while True:
            beat = state.beat()
            try:
                if local is not None:
                    local.record(beat)
                else:
                    client.post(url, json=beat)
            except (httpx.HTTPError, BadRequest):
                pass  # rank 0 not listening yet, or gone: its own health shows it
            state.changed.wait(every_s)
            state.changed.clear()
