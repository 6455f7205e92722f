"""``Sequence``: one request in the engine (``serving/engine.py``), what its reader holds.

Its prompt, its ``SamplingParams`` (and, when it samples, its own seeded ``torch.Generator``), the
tokens generated so far, and a queue of its events (``serving/messages.py``): a ``TokenEvent`` per
token, an ``ErrorEvent`` when it fails, then one ``EndEvent`` with its ``FinishReason``. The
engine writes it; the reader takes the events, or ``wait``s for the end, and ``cancel``s it when
it is gone (the engine drops it at its next step). Its times (arrived, first and last token,
finished) are monotonic seconds, for the metrics.
"""

from __future__ import annotations

import itertools
import queue
import time
from dataclasses import dataclass, field

import torch

from serving.messages import EndEvent, Event, FinishReason
from serving.protocol import SamplingParams

_IDS = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One request: its prompt, what it generated so far, and its events for a reader."""

    prompt: list[int]
    params: SamplingParams
    id: str = field(default_factory=lambda: f"seq-{next(_IDS)}")
    tokens: list[int] = field(default_factory=list)
    text: str | None = None  # set when stop strings are checked (what the client gets)
    finish_reason: FinishReason | None = None
    error: str | None = None  # why it failed, when finish_reason is ERROR
    events: queue.Queue[Event] = field(default_factory=queue.Queue)
    arrived: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None
    finished_at: float | None = None
    cancelled: bool = False
    generator: torch.Generator | None = None
    held: int = 0  # tokens of the engine's budget it holds while admitted

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """The reader is gone: the engine drops this sequence at its next step."""
        self.cancelled = True

    def wait(self, timeout: float | None = None) -> Sequence:
        """Block until finished (for a caller that does not stream); returns self."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"{self.id} did not finish within {timeout} s")
            try:
                event = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if isinstance(event, EndEvent):
                break
        return self
