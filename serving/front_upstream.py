"""The front's upstream: rank 0's address (followed from the group's record when a restart moves
rank 0 to another host), the front's two aiohttp clients to it, and the poller that reads its
readiness into the hold.

aiohttp, not httpx: its HTTP parser is C (llhttp) and taking a pooled connection costs the same
with 48 of them open; httpx checked every pooled connection's socket at each request, the largest
share of py-spy's samples of the front at 16 clients (benchmarks/front_cost.py, issue 32)."""

from __future__ import annotations

import asyncio
import json
import os
from contextlib import suppress

import aiohttp

from serving.front_hold import FrontConfig, Hold
from serving.http_server import HttpLimits

# Rank 0's uvicorn answers 503 past its connection limit (HttpLimits().max_connections, its
# default), and the ranks' heartbeats, the watchdog's canary and the front's own probes share it:
# the front's requests keep a quarter of it free (more wait in the front's pool).
UPSTREAM_CONNECTIONS = HttpLimits().max_connections * 3 // 4
# An idle pooled connection is closed by the front before rank 0's keep-alive closes it: a request
# sent on a connection rank 0 is closing would be cut, and one not safe to repeat would fail.
IDLE_S = max(1.0, HttpLimits().keep_alive_s - 1.0)
# What the front sends on as the client sent it: aiohttp adds none of its own.
AUTO_HEADERS = ("Content-Type", "User-Agent", "Accept", "Accept-Encoding")


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
        self.client: aiohttp.ClientSession | None = None
        self.probe: aiohttp.ClientSession | None = None
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
        """Stop polling and close every client: the current ones and those an upgrade left to
        close later (a poller cancelled in the middle of a move closes the old ones itself)."""
        tasks = [t for t in (self._poller, *self._closing) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in (self.client, self.probe):
            if client is not None:
                await client.close()

    def _open(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=2.0, sock_read=self.config.request_timeout_s)
        self.client = _session(self.url, UPSTREAM_CONNECTIONS, timeout)
        self.probe = _session(self.url, 2, aiohttp.ClientTimeout(total=2.0))

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
        try:
            ready = await self.readiness() is None
        except asyncio.CancelledError:  # the front stopping: the old clients are closed too
            await self._close(old, 0.0)
            raise
        if ready:
            closing = asyncio.create_task(self._close(old, self.config.request_timeout_s))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
            return
        self.hold.down(f"group restarted elsewhere (rank 0 is now at {self.url})")
        await self._close(old, 0.0)

    async def _close(self, clients: tuple[aiohttp.ClientSession | None, ...], after_s: float) -> None:
        try:
            await asyncio.sleep(after_s)
        finally:  # also when cancelled (the front stopping): the clients are closed either way
            for client in clients:
                if client is not None:
                    with suppress(Exception):
                        await client.close()

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
            async with self.probe.get("/health") as response:
                status, body = response.status, await response.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            return f"group restarting (rank 0 does not answer: {type(e).__name__})"
        try:
            ready = status == 200 and bool(json.loads(body).get("ready"))
        except (ValueError, AttributeError):
            ready = False
        return None if ready else f"group starting (rank 0's /health: HTTP {status}, not ready)"

    async def metrics(self) -> bytes:
        """Rank 0's ``/metrics``, or nothing while the group is down."""
        assert self.probe is not None
        try:
            async with self.probe.get("/metrics") as response:
                return await response.read() if response.status == 200 else b""
        except (aiohttp.ClientError, TimeoutError, RuntimeError):  # RuntimeError: a client closed as rank 0 moved
            return b""


def _session(url: str, connections: int, timeout: aiohttp.ClientTimeout) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=connections, keepalive_timeout=IDLE_S)
    return aiohttp.ClientSession(url, connector=connector, timeout=timeout, skip_auto_headers=AUTO_HEADERS)
