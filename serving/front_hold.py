"""The front's hold and repeat policy: what it is started with, when a request waits for the group
and for how long, which requests may be sent again, and the counters that tell it."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from serving import protocol
from serving.errors import NotReady
from serving.metrics import BY_NAME

GENERATION = frozenset({"/generate", "/v1/completions", "/v1/chat/completions"})
# What a group's death does to an exchange under way (aiohttp's errors): it never got there
# (refused, or no connection within the connect timeout), or it was cut (reset, closed before the
# answer's head, or amid its body). A read timeout is not among them: rank 0 is there, and slow.
CUT = (
    aiohttp.ClientOSError,
    aiohttp.ServerDisconnectedError,
    aiohttp.ClientPayloadError,
    aiohttp.ConnectionTimeoutError,
)


@dataclass(frozen=True)
class FrontConfig:
    """What the front is started with."""

    upstream: str  # rank 0's address, e.g. http://127.0.0.1:8501
    app: str = "app"
    hold_timeout_s: float = 60.0  # the longest a request waits for the group
    max_held: int = 256  # requests waiting at once; past it, 503 at once
    poll_s: float = 0.25  # how often rank 0's readiness is read while it is down
    request_timeout_s: float = 300.0  # one upstream exchange (a whole answer, or between two stream events)
    record: str | None = None  # a JSON file whose "endpoint" is rank 0's address now (the group's record)


class HoldExpired(NotReady):
    """The group did not come back within the hold (503 with Retry-After)."""


class FrontMetrics:
    """The front's counters (serving/metrics.py's SCHEMA, scope ``front``) in a registry of its own."""

    def __init__(self, app: str) -> None:
        self.registry = CollectorRegistry()

        def metric(cls: Any, name: str) -> Any:
            spec = BY_NAME[name]
            base = name.removesuffix("_total")
            return cls(base, spec.help, spec.labels, registry=self.registry)

        self.holds = metric(Counter, "nodewise_front_holds_total").labels(app)
        self.retries = metric(Counter, "nodewise_front_retries_total").labels(app)
        self.continued = metric(Counter, "nodewise_front_streams_continued_total").labels(app)
        self._refused = metric(Counter, "nodewise_front_hold_timeouts_total")
        self.held = metric(Gauge, "nodewise_front_held").labels(app)
        self.app = app

    def refused(self, reason: str) -> None:
        self._refused.labels(self.app, reason).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def totals(self) -> dict[str, int]:
        """The counters since this front started (``GET /front``'s ``counts``; the watchdog reports growth)."""

        def value(name: str, **labels: str) -> int:
            return int(self.registry.get_sample_value(name, {"app": self.app, **labels}) or 0)

        return {
            "held": value("nodewise_front_holds_total"),
            "retried": value("nodewise_front_retries_total"),
            "continued": value("nodewise_front_streams_continued_total"),
            "refused": sum(value("nodewise_front_hold_timeouts_total", reason=r) for r in ("timeout", "full")),
        }


@dataclass
class Hold:
    """The front's view of the group (ready or not, since when, why) and the requests waiting for it."""

    config: FrontConfig
    metrics: FrontMetrics
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    since: float | None = None  # when the group was last seen going down (time.time())
    why: str = "not checked yet"
    held: int = 0

    def down(self, why: str) -> None:
        """The group stopped answering: new requests wait from now on."""
        if self.ready.is_set() or self.since is None:
            self.since = time.time()
        self.ready.clear()
        self.why = why

    def mark(self, why: str | None) -> None:
        """What a readiness check found: None is ready, else why not."""
        if why is None:
            self.ready.set()
            self.since, self.why = None, ""
        else:
            self.down(why)

    def cut(self, error: Exception) -> None:
        """An exchange that was safe to repeat was cut: the group is down, the request goes again."""
        self.down(f"group restarting (a request was cut: {type(error).__name__})")
        self.metrics.retries.inc()

    async def wait_ready(self, deadline: float) -> None:
        """Return once the group is ready; raise ``HoldExpired`` at ``deadline``, ``NotReady`` if the hold is full."""
        if self.ready.is_set():
            return
        if self.held >= self.config.max_held:
            self.metrics.refused("full")
            raise NotReady(f"the front already holds {self.held} requests (max_held); retry in a few seconds")
        self.held += 1
        self.metrics.holds.inc()
        self.metrics.held.set(self.held)
        try:
            await asyncio.wait_for(self.ready.wait(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            self.metrics.refused("timeout")
            raise HoldExpired(
                f"the model's group was not ready within {self.config.hold_timeout_s:g} s ({self.why}); retry later"
            ) from None
        finally:
            self.held -= 1
            self.metrics.held.set(self.held)

    def state(self) -> dict[str, Any]:
        """The hold's part of ``GET /front``."""
        since = self.since
        return {
            "ready": self.ready.is_set(),
            "held": self.held,
            "why": self.why,
            "down_for_s": round(time.time() - since, 1) if since is not None else 0.0,
            "hold_timeout_s": self.config.hold_timeout_s,
        }


def prepare(path: str, method: str, body: bytes) -> tuple[bytes, dict[str, Any] | None, bool]:
    """(the body to send, its JSON object if a generation, whether repeating it is safe).

    A sampled generation without a seed (``protocol.is_sampled``, the rule rank 0 draws its own
    seed by) gets one here, so sending it again draws the same tokens."""
    if method in ("GET", "HEAD") or path == "/invocations":
        return body, None, True
    if path not in GENERATION:
        return body, None, False
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, or nested past Python's parser (fuzzing found it)
        return body, None, False  # rank 0 answers the 400
    if not isinstance(payload, dict):
        return body, None, False
    temperature, top_k = payload.get("temperature"), payload.get("top_k")
    if not (_number(temperature) and (top_k is None or _number(top_k))):
        return body, payload, True  # greedy (no temperature), or a 400 from rank 0: the same answer again
    if protocol.is_sampled(temperature, top_k) and payload.get("seed") is None:
        payload["seed"] = protocol.draw_seed()
        body = json.dumps(payload).encode()
    return body, payload, True


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def not_ready(content: bytes) -> bool:
    """A 503's body that is rank 0's ``NotReady`` (``NOT_READY`` in its error body, or ``not_ready``
    in OpenAI's), not uvicorn's connection limit: nothing was done, so it is sent again."""
    try:
        body = json.loads(content)
    except (ValueError, RecursionError):
        return False
    if not isinstance(body, dict):
        return False
    inner = body.get("error")
    code = body.get("error_code") or (inner.get("code") if isinstance(inner, dict) else None)
    return str(code).upper() == NotReady.code
