"""How the engine (``serving/engine.py``) chooses each sequence's next token, and what a sequence
that fails is told. Plain torch.

- ``choose(seqs, logits)``: one token per row of a step's next-token scores (``[rows, vocab]``),
  the greedy rows' in one pass over the batch; a row whose scores hold NaN or +inf, or no finite
  score at all, or whose sampling raises, gets ``FAILED`` and a reason instead, the other rows
  are not affected.
- ``sample(seq, logits)``: per request (``SamplingParams``, with its ranges in
  ``serving/protocol.py``): temperature, top-k, top-p, drawn with the sequence's own
  ``torch.Generator`` (seeded, so the same seed gives the same tokens whatever else runs in the
  batch). Probabilities that are not finite raise ``NotFinite`` here rather than reach
  ``torch.multinomial``, which on a GPU asserts on the device instead of raising.
- ``failure(seq, error)`` and ``forward_failed(error, count)``: the one line a client is told
  (``ErrorEvent``); the cause is logged (``nodewise.engine``), never sent.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from serving.sequence import Sequence

FAILED = -1  # the token of a sequence that failed, in what ``agree`` sees
_log = logging.getLogger("nodewise.engine")


class NotFinite(ArithmeticError):
    """A sequence's scores or probabilities hold NaN or infinities."""


def choose(seqs: list[Sequence], logits: torch.Tensor) -> tuple[list[int], dict[int, str]]:
    """Each sequence's next token from its row of ``logits`` (``[rows, vocab]``), ``FAILED`` for
    one whose token cannot be chosen, and the failures (row: what its client is told)."""
    failures: dict[int, str] = {}
    # one pass over the batch for what is not finite, and for every greedy row's token
    nan_or_inf = (torch.isnan(logits) | torch.isposinf(logits)).any(dim=-1).tolist()
    none_finite = (~torch.isfinite(logits).any(dim=-1)).tolist()
    greedy = torch.argmax(logits, dim=-1).tolist()
    chosen = []
    for i, seq in enumerate(seqs):
        try:
            if nan_or_inf[i] or none_finite[i]:
                kind = "NaN or +inf" if nan_or_inf[i] else "only -inf"
                raise NotFinite(f"the model's next-token scores hold {kind}")
            chosen.append(greedy[i] if seq.params.greedy else sample(seq, logits[i]))
        except Exception as e:
            failures[i] = failure(seq, e)
            chosen.append(FAILED)
    return chosen, failures


def sample(seq: Sequence, logits: torch.Tensor) -> int:
    """A token drawn from ``logits`` as ``seq``'s parameters say; ``NotFinite`` when the
    probabilities are not (a model's scores this steep at this temperature)."""
    params = seq.params
    scores = logits.float() / params.temperature
    if params.top_k and params.top_k < scores.shape[-1]:
        cut = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < cut, -math.inf)
    if params.top_p < 1:
        ordered, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
        outside = cumulative - torch.softmax(ordered, dim=-1) >= params.top_p  # keep the first that crosses
        outside[0] = False  # and always the likeliest: a top_p below float32's range (5e-324) is 0 here
        scores = scores.masked_fill(torch.zeros_like(outside).scatter(0, order, outside), -math.inf)
    probs = torch.softmax(scores, dim=-1)
    # checked here: multinomial on a GPU asserts on the device (every request then fails), not raises
    if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0:
        raise NotFinite(f"the sampling probabilities are not finite at temperature={params.temperature}")
    return int(torch.multinomial(probs, 1, generator=seq.generator).item())


def failure(seq: Sequence, error: Exception) -> str:
    """The one line a client is told about its sequence's failure (the cause is logged)."""
    at = f"{seq.id} failed at token {len(seq.tokens) + 1}"
    if isinstance(error, NotFinite):
        _log.warning("%s: %s", at, error)
        return f"{at}: {error}; it ended alone, the rest of its batch was not affected"
    _log.error("%s", at, exc_info=error)
    first = (str(error).strip().splitlines() or [""])[0][:200]
    return f"{at} ({type(error).__name__}: {first}); it ended alone, the rest of its batch was not affected"


def forward_failed(error: Exception, count: int) -> str:
    return (
        f"the model's forward pass failed ({type(error).__name__}) for the {count} sequence(s) it held, this one "
        "among them; the server goes on serving: retry, or see the server log"
    )
