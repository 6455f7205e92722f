"""The messages between the serving processes' parts: typed, never tuples read by position.

- **Events** go from the engine to whoever reads a sequence (``Sequence.events``): a
  ``TokenEvent`` per token the reader may see, an ``ErrorEvent`` with the one line a client is
  told when the sequence failed, then always one ``EndEvent`` with its ``FinishReason``, last.
- **Finish reasons** are a ``FinishReason`` (a ``str`` enum: its value is the engine's word, the
  one ``/health`` counts by and ``/generate`` streams). ``FinishReason.openai`` is what an OpenAI
  response says: ``"stop"``, ``"length"``, ``"abort"`` for a cancelled sequence, ``"error"``.
- **Commands** go from rank 0's HTTP threads to its step loop (``Frontend.commands``), and each
  step's ``Plan`` from rank 0 to every rank (``torch.distributed.broadcast_object_list``, which
  pickles it): ``Add`` and ``Cancel`` change the engine's batch; ``Forward``, ``Generate`` or
  ``Tick`` is the step's one piece of work besides it. Every message is a frozen, slotted
  dataclass of plain values (token ids, numpy arrays, dicts of sampling fields), so what crosses
  the wire stays small and every rank reads it the same way.

Receivers dispatch on the class (``isinstance`` or ``match``). This module imports nothing
heavier than the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class FinishReason(StrEnum):
    """Why a sequence ended."""

    STOP = "stop"  # an end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens reached
    CANCELLED = "cancelled"  # the reader went away (or timed out)
    ERROR = "error"  # this sequence failed (an ErrorEvent says why) or its step did

    @property
    def openai(self) -> str:
        """The ``finish_reason`` an OpenAI response gives (vLLM's "abort" for a cancelled one)."""
        return "abort" if self is FinishReason.CANCELLED else self.value


# -- events: the engine -> a sequence's reader ---------------------------------------------------
@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One new token a reader may see."""

    token: int


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    """The one line a client is told about why its sequence failed; its ``EndEvent`` follows."""

    message: str


@dataclass(frozen=True, slots=True)
class EndEvent:
    """The sequence is over; the last event it has."""

    reason: FinishReason


Event = TokenEvent | ErrorEvent | EndEvent


# -- commands: rank 0's HTTP threads -> its step loop -> every rank ---------------------------------
@dataclass(frozen=True, slots=True)
class Add:
    """A prompt joins the engine's batch; ``sampling`` holds ``SamplingParams``' other fields."""

    request_id: str
    prompt: tuple[int, ...]
    max_tokens: int
    sampling: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Cancel:
    """The request's client is gone: it leaves the batch at the next step."""

    request_id: str


@dataclass(frozen=True, slots=True, eq=False)
class Forward:
    """One forward pass over ``ids`` (``[batch, sequence]``), for ``/invocations`` with token ids."""

    ids: Any  # numpy array


@dataclass(frozen=True, slots=True, eq=False)
class Generate:
    """Greedy generation of ``new_tokens`` for each prompt in one step (no batching engine)."""

    prompts: list[Any]  # numpy arrays of token ids
    new_tokens: int


@dataclass(frozen=True, slots=True)
class Tick:
    """No work this step: the ranks step together to show they are alive."""


Work = Forward | Generate | Tick
Command = Work | Add | Cancel


@dataclass(frozen=True, slots=True, eq=False)
class Plan:
    """What rank 0 broadcasts each step: its one piece of work, and the batch's changes."""

    work: Work = field(default_factory=Tick)
    adds: tuple[Add, ...] = ()
    cancels: tuple[str, ...] = ()  # request ids
