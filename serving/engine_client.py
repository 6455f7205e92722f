"""What an LLM front end talks to: an ``EngineClient``, never the engine's scheduler.

The routes (``serving/llm_routes.py``) submit a prompt and read its typed events
(``serving.messages``: ``TokenEvent``\\ s, an ``ErrorEvent`` when it failed, then one ``EndEvent``)
as an async iterator on their own event loop; they cancel a request whose client left, ask whether
the engine takes requests, and read its load. The shape is vLLM's ``EngineClient``
(``generate(prompt, params, request_id)`` as an async generator, ``abort(request_id)``), so a GPU
engine (vLLM's ``AsyncLLM``) plugs in as one more implementation.

- ``LocalEngineClient``: the torch engine on a thread of this process (a Ray Serve replica, a
  test). Its events cross from the engine thread to the event loop with
  ``loop.call_soon_threadsafe``; nothing blocks the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

from serving.engine import Engine, SamplingParams
from serving.errors import NotReady
from serving.messages import EndEvent, Event
from serving.metrics import EngineLoad


class EngineClient(Protocol):
    """A generating engine as the front end sees it."""

    max_tokens_in_flight: int  # what the engine holds at once (a request over it is a 400)

    def generate(self, prompt: Sequence[int], params: SamplingParams, request_id: str) -> AsyncIterator[Event]:
        """The request's events, ending with its ``EndEvent``; an exit before that cancels it."""
        ...

    def cancel(self, request_id: str) -> None:
        """The client is gone: the request leaves the batch at the engine's next step."""
        ...

    def check_ready(self) -> None:
        """Raise ``NotReady`` (503) naming why, when the engine takes no requests."""
        ...

    def load(self) -> EngineLoad:
        """Sequences running and waiting, tokens in flight and the budget (metrics, autoscaling)."""
        ...


class LoopEvents:
    """Where the engine thread puts a sequence's events: handed to an ``asyncio.Queue`` on its loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def put(self, event: Event) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody reads this sequence any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


class LocalEngineClient:
    """The torch engine (``serving.engine.Engine``) on a thread of this process."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.max_tokens_in_flight = engine.max_tokens_in_flight
        self._sequences: dict[str, Any] = {}

    async def generate(self, prompt: Sequence[int], params: SamplingParams, request_id: str) -> AsyncIterator[Event]:
        seq = self.engine.add(prompt, params, request_id=request_id)
        self._sequences[request_id] = seq
        earlier: queue.Queue[Event] = seq.events
        bridge = LoopEvents(asyncio.get_running_loop())
        seq.events = bridge  # type: ignore[assignment]  # from now on the engine thread hands its events to this loop
        ended = False
        try:
            while not earlier.empty():  # what the engine put before the hand-over comes first
                bridge.queue.put_nowait(earlier.get_nowait())
            while not ended:
                event = await bridge.queue.get()
                ended = isinstance(event, EndEvent)
                yield event
        finally:
            self._sequences.pop(request_id, None)
            if not ended:
                seq.cancel()

    def cancel(self, request_id: str) -> None:
        seq = self._sequences.get(request_id)
        if seq is not None:
            seq.cancel()

    def check_ready(self) -> None:
        if not self.engine.alive:
            raise NotReady(["the generation engine's thread is not running"])

    def load(self) -> EngineLoad:
        engine = self.engine
        return EngineLoad(
            engine.running, engine.waiting, engine.tokens_in_flight, engine.max_tokens_in_flight, engine.blocked
        )
