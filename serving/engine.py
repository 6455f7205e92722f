"""Continuous (iteration-level) batching for a causal LM: one engine, plain Python and torch.

Requests join the running batch at the next step and leave it when they finish, each with its
own KV cache rows; one forward pass per step decodes one token for every running sequence.

- **The batch cache** (``serving/batch_cache.py``). Every running sequence is a row of one
  key/value tensor per layer, left-padded to the longest row, masked and positioned so that a
  row's tokens are what it would get served alone. The sequences that join at a step are
  prefilled together (their prompts left-padded in one pass, so a burst of arrivals costs one
  pass, not one each) and their rows padded into the batch; one that leaves is dropped from it,
  and padding every row shares is trimmed.
- **The token budget.** Each admitted sequence holds ``len(prompt) + max_tokens`` tokens of the
  budget (its KV cache at worst), released when it finishes. ``max_tokens_in_flight`` comes
  from the plan's KV-cache budget. What does not fit waits, first come first served; a request
  larger than the whole budget is refused when it arrives (``BudgetError``).
- **Sampling** per request (``SamplingParams``, with its ranges in ``serving/protocol.py``; the
  drawing and the failure lines in ``serving/sampling.py``): greedy by default; temperature,
  top-k, top-p and a seed (a ``torch.Generator`` per sequence, so the same seed gives the same
  tokens whatever else runs in the batch); ``max_tokens``; stop strings (with a ``decode``
  function); the model's end-of-sequence ids.
  A ``temperature`` below ``GREEDY_BELOW`` (1e-5, as vLLM) is greedy: dividing by a tinier one
  overflows the scores.
- **Streaming and cancellation.** Each ``Sequence`` (``serving/sequence.py``) has a queue of
  events (a ``TokenEvent`` per token, then an ``EndEvent`` with its ``FinishReason``;
  ``serving/messages.py``); ``cancel()`` frees its slot at the next step.
- **A request fails alone.** A sequence whose next-token scores are not finite, or whose sampling
  raises, ends with ``FinishReason.ERROR`` (an ``ErrorEvent`` with the reason before its end) and
  leaves the batch; the other rows go on as if it had never been there. A forward pass that raises
  cannot be laid on one sequence: the sequences in it end with an error, and the engine goes on
  serving. ``agree`` (optional) makes every rank of a tensor-parallel group take the same tokens
  and failures (rank 0's), so the ranks' batches never diverge.

The engine knows nothing of HTTP, Prefect or ranks: the servers drive ``step()`` (or
``start()`` a thread that does) and a tensor-parallel module is used like any other.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import Any

import torch

from serving.batch_cache import BatchCache, prefill_inputs
from serving.messages import EndEvent, ErrorEvent, FinishReason, TokenEvent
from serving.protocol import GREEDY_BELOW, SamplingError, SamplingParams  # their ranges: one home
from serving.sampling import FAILED, choose, failure, forward_failed
from serving.sequence import Sequence

__all__ = ["GREEDY_BELOW", "BudgetError", "Engine", "SamplingError", "SamplingParams", "Sequence"]

_log = logging.getLogger("nodewise.engine")


class BudgetError(ValueError):
    """A request needs more tokens than the engine can ever hold (the servers answer 400)."""


class Engine:
    """Continuous batching over ``module`` (a transformers causal LM, sharded or not)."""

    def __init__(
        self,
        module: Any,
        *,
        max_tokens_in_flight: int,
        eos_token_ids: Seq[int] = (),
        max_batch: int = 64,
        decode: Callable[[list[int]], str] | None = None,
        device: str | torch.device = "cpu",
        agree: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """``agree`` takes a step's chosen tokens (``FAILED`` for a sequence that failed) and returns
        the ones every rank goes on with: a tensor-parallel group passes rank 0's broadcast."""
        if max_tokens_in_flight < 2:
            raise ValueError(f"max_tokens_in_flight={max_tokens_in_flight} must be at least 2")
        self.module = module
        self.max_tokens_in_flight = max_tokens_in_flight
        self.eos = frozenset(int(t) for t in eos_token_ids)
        self.max_batch = max_batch
        self.decode = decode
        self.device = torch.device(device)
        self.agree = agree
        # an error that no sequence survives and nothing here can mend (a tensor-parallel group's
        # rank gone): raised from step() instead of ending the sequences, for the host to act on
        self.fatal: Callable[[BaseException], bool] = lambda error: False
        self._lock = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._rows: list[Sequence] = []  # the batch, in cache row order
        self._cache = BatchCache(self.device)  # the batch's KV cache rows, in the order of _rows
        self._held = 0  # tokens of the budget held by running sequences
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0
        self.finished: dict[str, int] = {}  # how many sequences ended, by reason (FinishReason's value)
        # Told of every token as it comes: (its sequence, the sequence's previous token's time or
        # None for its first, now), monotonic seconds. The servers' metrics (serving/metrics.py).
        self.on_token: Callable[[Sequence, float | None, float], None] | None = None

    @classmethod
    def for_model(
        cls, module: Any, tokenizer: Any | None, *, max_tokens_in_flight: int, max_batch: int, device: str = "cpu"
    ) -> Engine:
        """An engine over a transformers causal LM: its end-of-sequence ids from the model's
        ``generation_config``, its text (for stop strings) from ``tokenizer`` when it has one."""
        config = getattr(module, "generation_config", None)
        eos = getattr(config, "eos_token_id", None)
        eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        return cls(
            module,
            max_tokens_in_flight=max_tokens_in_flight,
            eos_token_ids=eos_ids,
            max_batch=max_batch,
            decode=(lambda ids: tokenizer.decode(ids, skip_special_tokens=True)) if tokenizer is not None else None,
            device=device,
        )

    # -- what servers call -----------------------------------------------------------------------
    def add(self, prompt: Seq[int], params: SamplingParams | None = None, request_id: str | None = None) -> Sequence:
        """Queue a request; it joins the batch at a step where its tokens fit the budget."""
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise BudgetError("the prompt is empty; give at least one token")
        need = len(prompt) + params.max_tokens
        if need > self.max_tokens_in_flight:
            raise BudgetError(
                f"the prompt ({len(prompt)} tokens) plus max_tokens ({params.max_tokens}) is {need} tokens, over "
                f"the {self.max_tokens_in_flight} this server holds at once; shorten the prompt or lower max_tokens"
            )
        seq = Sequence(prompt=prompt, params=params, **({"id": request_id} if request_id else {}))
        if not params.greedy:
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
            seq.generator = torch.Generator().manual_seed(seed)
        with self._lock:
            self._waiting.append(seq)
            self._lock.notify_all()
        return seq

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._rows)

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def blocked(self) -> int:
        """Waiting sequences the batch cannot take now: it is full, or the first in line does not fit
        the token budget. 0 when what waits only waits for the next step to admit it (the
        autoscaling policy's signal, serving/autoscaling.py: a replica with room asks for no other)."""
        with self._lock:
            if not self._waiting:
                return 0
            head = self._waiting[0]
            need = len(head.prompt) + head.params.max_tokens
            full = len(self._rows) >= self.max_batch or self._held + need > self.max_tokens_in_flight
            return len(self._waiting) if full else 0

    @property
    def tokens_in_flight(self) -> int:
        """Tokens of the budget that running sequences hold."""
        return self._held

    @property
    def alive(self) -> bool:
        """Whether the engine's own thread runs (``start``ed and not stopped or dead)."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def start(self) -> None:
        """Run steps on a thread of its own while there is work; sleep when there is none."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._waiting or self._rows or self._stopping):
                    self._lock.wait()
                if self._stopping:
                    return
            self.step()

    # -- one step ---------------------------------------------------------------------------------
    def step(self) -> None:
        """Drop cancelled sequences, admit what fits, prefill the newcomers, decode one token for all.

        Never raises but for a ``fatal`` error: a sequence that fails ends alone (``ERROR``), a
        forward pass that fails ends the sequences it held, and what is queued is served at the
        next steps."""
        admitted: list[Sequence] = []
        try:
            self._drop([i for i, s in enumerate(self._rows) if s.cancelled], FinishReason.CANCELLED)
            admitted = self._admit()
            if admitted:
                self._prefill(admitted)
            if self._rows:
                self._decode()
        except Exception as e:  # the batch's bookkeeping itself: end what runs, keep the queue
            if self.fatal(e):
                raise
            _log.exception("engine step %d failed; the sequences in it end", self.steps)
            self._fail_rows(f"the engine's step failed ({type(e).__name__}); see the server log", admitted)
        self.steps += 1

    def _admit(self) -> list[Sequence]:
        admitted = []
        with self._lock:
            while self._waiting and len(self._rows) + len(admitted) < self.max_batch:
                head = self._waiting[0]
                if head.cancelled:
                    self._waiting.popleft()
                    self._finish(head, FinishReason.CANCELLED)
                    continue
                need = len(head.prompt) + head.params.max_tokens
                if self._held + need > self.max_tokens_in_flight:
                    break  # first come, first served: the head waits for room
                self._waiting.popleft()
                self._held += need
                head.held = need
                admitted.append(head)
        return admitted

    @torch.inference_mode()
    def _prefill(self, seqs: list[Sequence]) -> None:
        """The newcomers' prompts in one forward pass (left-padded to the longest, each row masked
        and positioned as if alone), their first tokens, and their cache rows into the batch."""
        ids, pads, kwargs = prefill_inputs([s.prompt for s in seqs], self.device)
        try:
            out = self.module(input_ids=ids, use_cache=True, logits_to_keep=1, **kwargs)
        except Exception as e:  # one pass for every newcomer: none of them can be told apart
            if self.fatal(e):
                raise
            _log.exception("prefill of %s failed", [s.id for s in seqs])
            for seq in seqs:
                self._release(seq)
                self._finish(seq, FinishReason.ERROR, forward_failed(e, len(seqs)))
            return
        staying = [i for i, done in enumerate(self._advance(seqs, out.logits[:, -1])) if not done]
        for seq in (s for i, s in enumerate(seqs) if i not in staying):
            self._release(seq)  # done on its first token (or failed): it never joins the batch
        if not staying:
            return
        keys = [layer.keys for layer in out.cache.layers]
        values = [layer.values for layer in out.cache.layers]
        if len(staying) < len(seqs):
            index = torch.tensor(staying, device=self.device)
            keys = [k.index_select(0, index) for k in keys]
            values = [v.index_select(0, index) for v in values]
        self._cache.join(keys, values, [pads[i] for i in staying])
        self._rows.extend(seqs[i] for i in staying)

    @torch.inference_mode()
    def _decode(self) -> None:
        rows = len(self._rows)
        last = torch.tensor([[s.tokens[-1]] for s in self._rows], dtype=torch.long, device=self.device)
        mask, positions, cache = self._cache.decode_inputs()
        try:
            out = self.module(input_ids=last, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        except Exception as e:  # one pass for the whole batch: no row can be told apart
            if self.fatal(e):
                raise
            _log.exception("decode step %d failed; its %d sequences end", self.steps, rows)
            self._fail_rows(forward_failed(e, rows))
            return
        self._cache.update(out.cache)
        finished = [i for i, done in enumerate(self._advance(self._rows, out.logits[:, -1])) if done]
        self._drop(finished, None)

    # -- the batch (its cache: serving/batch_cache.py) ----------------------------------------------
    def _drop(self, indices: list[int], reason: FinishReason | None) -> None:
        if not indices:
            return
        for i in indices:
            seq = self._rows[i]
            if reason is not None:
                self._finish(seq, reason)
            self._release(seq)
        leaving = set(indices)
        keep = [i for i in range(len(self._rows)) if i not in leaving]
        if not keep:
            self._rows = []
            self._cache.clear()
            return
        self._cache.keep(keep)
        self._rows = [self._rows[i] for i in keep]

    def _release(self, seq: Sequence) -> None:
        """Give back the budget an admitted sequence held (once)."""
        with self._lock:
            self._held -= seq.held
            seq.held = 0

    def _fail_rows(self, message: str, admitted: Seq[Sequence] = ()) -> None:
        """End every running sequence (and ``admitted``) with ``message``; empty the batch cache."""
        for seq in [*self._rows, *admitted]:
            self._release(seq)
            if not seq.done:
                self._finish(seq, FinishReason.ERROR, message)
        self._rows = []
        self._cache.clear()

    # -- tokens -----------------------------------------------------------------------------------
    def _advance(self, seqs: list[Sequence], logits: torch.Tensor) -> list[bool]:
        """Each sequence's next token from its row of ``logits`` (``[rows, vocab]``); whether each
        is done now. One whose token cannot be chosen, or whose text cannot be checked, ends alone."""
        chosen, failures = choose(seqs, logits)
        if self.agree is not None:  # every rank goes on with the same tokens and failures
            agreed = self.agree(torch.tensor(chosen, dtype=torch.long, device=self.device)).tolist()
            for i, token in enumerate(agreed):
                if token == FAILED and i not in failures:
                    failures[i] = f"{seqs[i].id} failed at token {len(seqs[i].tokens) + 1} on rank 0"
                elif token != FAILED:
                    failures.pop(i, None)
            chosen = agreed
        done = []
        for i, seq in enumerate(seqs):
            if i in failures:
                self._finish(seq, FinishReason.ERROR, failures[i])
                done.append(True)
                continue
            try:
                done.append(self._append(seq, chosen[i]))
            except Exception as e:  # the stop strings' decode: this sequence's text alone
                self._finish(seq, FinishReason.ERROR, failure(seq, e))
                done.append(True)
        return done

    def _append(self, seq: Sequence, token: int) -> bool:
        """Record ``token``; True when ``seq`` has finished (and its end is sent)."""
        now, previous = time.monotonic(), seq.last_token_at
        if seq.first_token_at is None:
            seq.first_token_at = now
        seq.last_token_at = now
        if self.on_token is not None:
            self.on_token(seq, previous, now)
        seq.tokens.append(token)
        if token in self.eos:
            self._finish(seq, FinishReason.STOP)
            return True
        # A reader sees every token but an end-of-sequence one, the one that completes a stop
        # string included: it cuts the text itself (and held back what could begin one).
        seq.events.put(TokenEvent(token))
        if seq.params.stop and self.decode is not None:
            text = self.decode(seq.tokens)
            cuts = [i for i in (text.find(s) for s in seq.params.stop) if i >= 0]
            if cuts:
                seq.text = text[: min(cuts)]
                self._finish(seq, FinishReason.STOP)
                return True
        if len(seq.tokens) >= seq.params.max_tokens:
            self._finish(seq, FinishReason.LENGTH)
            return True
        return False

    def _finish(self, seq: Sequence, reason: FinishReason, error: str | None = None) -> None:
        self.finished[reason.value] = self.finished.get(reason.value, 0) + 1
        seq.finish_reason = reason
        seq.finished_at = time.monotonic()
        if error is not None:
            seq.error = error
            seq.events.put(ErrorEvent(error))
        seq.events.put(EndEvent(reason))
