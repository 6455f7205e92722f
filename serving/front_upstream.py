"""The front's upstream: rank 0's address (followed from the group's record when a restart moves
rank 0 to another host), the front's two httpx clients to it, and the poller that reads its
readiness into the hold."""

from __future__ import annotations

import asyncio
import json
import os
from contextlib import suppress

import httpx

from serving.front_hold import FrontConfig, Hold
from serving.http_server import HttpLimits

# Rank 0's uvicorn answers 503 past its connection limit (HttpLimits().max_connections, its
# default), and the ranks' heartbeats, the watchdog's canary and the front's own probes share it:
# the front's requests keep a quarter of it free (more wait in the front's pool).
UPSTREAM_CONNECTIONS = HttpLimits().max_connections * 3 // 4


class Upstream:
    """Rank 0 as the front reaches it.

    ``client`` carries requests; ``probe`` carries ``/health`` and ``/metrics``, never queued behind
    them. With ``config.record`` (the group's record, a JSON file whose ``endpoint`` is rank 0's
    address), every poll reads it again when it changed: a restarted group whose rank 0 runs on
    another host (a spare took its host's place) is reached at its new address, held requests go
    there, and the clients of the old one are closed (what was under way on them is cut, and
    repeated when that is safe)."""

    def __init__(self, config: FrontConfig, hold: Hold) -> None:
        self.config = config
        self.hold = hold
        self.url = config.upstream
        self.client: httpx.AsyncClient | None = None
        self.probe: httpx.AsyncClient | None = None
        self._record_stamp: tuple[int, int] | None = None
        self._poller: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()  # old clients closing after a switch (``_move``)

    async def start(self) -> None:
        """Open the clients and start reading readiness (at the first request: the server runs
        without lifespan events)."""
        if self.client is not None:
            return
        self.follow_record()
        self._open()
        self.hold.mark(await self.readiness())  # the first request does not wait for the poller
        self._poller = asyncio.create_task(self._poll())

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        for client in (self.client, self.probe):
            if client is not None:
                await client.aclose()

    def _open(self) -> None:
        limits = httpx.Limits(max_connections=UPSTREAM_CONNECTIONS, max_keepalive_connections=UPSTREAM_CONNECTIONS)
        timeout = httpx.Timeout(self.config.request_timeout_s, connect=2.0)
        self.client = httpx.AsyncClient(base_url=self.url, timeout=timeout, limits=limits)
        probe = httpx.Limits(max_connections=2, max_keepalive_connections=2)
        self.probe = httpx.AsyncClient(base_url=self.url, timeout=2.0, limits=probe)

    def follow_record(self) -> bool:
        """Read rank 0's address from the group's record if the record changed since; True if it moved."""
        if self.config.record is None:
            return False
        try:
            stat = os.stat(self.config.record)
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp == self._record_stamp:
                return False
            with open(self.config.record, encoding="utf-8") as f:
                endpoint = json.load(f).get("endpoint")
        except (OSError, ValueError, AttributeError):
            return False  # no group on record (stopped, or being relaunched): keep the last address
        self._record_stamp = stamp
        if not isinstance(endpoint, str) or not endpoint or endpoint.rstrip("/") == self.url:
            return False
        self.url = endpoint.rstrip("/")
        return True

    async def _move(self) -> None:
        """Rank 0 moved: new clients to its new address.

        A group that already answers ready there (an upgrade switched to a group started beside the
        old one) takes new requests at once, and what is under way on the old group finishes there:
        its clients close after ``request_timeout_s``. Otherwise (a restart) the old clients close now,
        cutting what was under way on them (repeated when that is safe)."""
        old = (self.client, self.probe)
        self._open()
        if await self.readiness() is None:
            closing = asyncio.create_task(self._close(old, self.config.request_timeout_s))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
            return
        self.hold.down(f"group restarted elsewhere (rank 0 is now at {self.url})")
        await self._close(old, 0.0)

    async def _close(self, clients: tuple[httpx.AsyncClient | None, ...], after_s: float) -> None:
        await asyncio.sleep(after_s)
        for client in clients:
            if client is not None:
                with suppress(Exception):
                    await client.aclose()

    async def _poll(self) -> None:
        """Read rank 0's /health: often while it is down, now and then while it serves."""
        while True:
            if self.follow_record():
                await self._move()
            why = await self.readiness()
            self.hold.mark(why)
            await asyncio.sleep(self.config.poll_s if why else 1.0)

    async def readiness(self) -> str | None:
        """None when rank 0's ``/health`` says ready, else why the group is not."""
        assert self.probe is not None
        try:
            response = await self.probe.get("/health")
        except httpx.HTTPError as e:
            return f"group restarting (rank 0 does not answer: {type(e).__name__})"
        try:
            ready = response.status_code == 200 and bool(response.json().get("ready"))
        except (ValueError, AttributeError):
            ready = False
        return None if ready else f"group starting (rank 0's /health: HTTP {response.status_code}, not ready)"
