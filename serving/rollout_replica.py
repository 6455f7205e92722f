"""A replica's part in a rollout (``serving/rollout.py``), for ``ModelServer`` (``serving/app.py``).

``ReplicaRollout`` is the rollout half of a Serve replica; ``ModelServer`` holds one and hands it
Serve's calls (``reconfigure``, ``rollout_stats``, ``score``, ``score_many``) and, while a
rollout runs, its ``/invocations``:

- ``reconfigure`` takes Serve's ``user_config`` (``{"rollout": RolloutConfig or None}``); the
  stats (``RolloutStats``) restart with a new epoch, and ``rollout_stats`` hands them to the
  decision flow, which calls every replica directly.
- As the champion, ``invocations`` answers ``/invocations`` beside a challenger: in
  ``canary`` mode the challenger's app answers a share (the champion answers when it fails, so a
  client never sees its failure); in ``shadow`` mode the champion answers and copies a share to
  the challenger in the background, in batches (``score_many``), at most
  ``max_shadow_in_flight`` at once (what does not fit is skipped, and counted).
- As the challenger, ``score`` and ``score_many`` answer the champion: the answer and the time it
  took here, never raising (a failure is an answer with ``ok: False``).

Every answer carries ``x-nodewise-version`` (``VERSION_HEADER``), the version that answered.
The replica gives it its spec, its outcomes, its ``predict`` and its ``log_failure``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ray import serve
from starlette.responses import Response

from serving._protocol import encode_predictions
from serving.errors import error_response
from serving.rollout import RolloutConfig, RolloutStats

if TYPE_CHECKING:
    from serving.app import Outcomes
    from serving.spec import ModelServeSpec

VERSION_HEADER = "x-nodewise-version"  # the model version that answered (a canary's share is visible)
_BACKGROUND: set[asyncio.Task[None]] = set()  # shadow calls in flight (a reference keeps each alive)

_JSON = "application/json"


Predict = Callable[[bytes, str], Awaitable[Any]]


class ReplicaRollout:
    """A replica's part in a rollout: a challenger beside this champion, or this one as the challenger."""

    def __init__(
        self, spec: ModelServeSpec, outcomes: Outcomes, predict: Predict, log_failure: Callable[[str, Exception], None]
    ) -> None:
        self.spec, self.outcomes = spec, outcomes
        self._predict, self._log_failure = predict, log_failure
        self.rollout: RolloutStats | None = None  # a challenger beside this champion (serving/rollout.py)
        self._challenger: Any = None
        self._challenger_many: Any = None

    @property
    def version_header(self) -> dict[str, str]:
        return {VERSION_HEADER: self.spec.model_version}

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve's ``user_config``: ``{"rollout": RolloutConfig or None}``. Stats restart with a new epoch."""
        raw = (config or {}).get("rollout")
        self._challenger = self._challenger_many = None  # handles made on first use (the app may be starting)
        if raw is None:
            self.rollout = None
            return
        cfg = RolloutConfig.model_validate(raw)
        if self.rollout is None or self.rollout.cfg.epoch != cfg.epoch:
            self.rollout = RolloutStats(cfg)
        else:
            self.rollout.cfg = cfg

    def rollout_stats(self) -> dict[str, Any] | None:
        """For the decision flow, which calls every replica directly."""
        return None if self.rollout is None else self.rollout.snapshot()

    async def score(self, body: bytes, content_type: str) -> dict[str, Any]:
        """A champion's call to this challenger: the answer and the time it took here, never raising."""
        started = time.perf_counter()
        try:
            answer = encode_predictions(await self._predict(body, content_type))
        except Exception as e:
            status, error = error_response(e, self._log_failure, where="the challenger's replica log")
            detail = f"{type(e).__name__}: {e}"[:300]  # for the rollout's record (operators), never a client
            return {
                "ok": False,
                "status": status,
                "body": error,
                "detail": detail,
                "seconds": time.perf_counter() - started,
            }
        self.outcomes.add(ok=True)
        seconds = time.perf_counter() - started
        return {"ok": True, "status": 200, "body": answer, "seconds": seconds, "version": self.spec.model_version}

    async def invocations(self, body: bytes, content_type: str) -> Response | None:
        """``/invocations`` while a rollout runs (the challenger's share, or a copy to it); None when none runs."""
        stats = self.rollout
        if stats is None:
            return None
        if stats.cfg.mode == "canary" and stats.pick_challenger():
            answer = await self._ask_challenger(stats, body, content_type)
            if answer["ok"]:
                stats.challenger_answered += 1
                stats.requests += 1
                return Response(answer["body"], media_type=_JSON, headers={VERSION_HEADER: answer["version"]})
            # the challenger failed (counted): the champion answers, the client sees no failure
        started = time.perf_counter()
        try:
            own = encode_predictions(await self._predict(body, content_type))
        except Exception:
            stats.champion_done(time.perf_counter() - started, ok=False)
            raise
        stats.champion_done(time.perf_counter() - started, ok=True)
        if stats.cfg.mode == "shadow" and stats.pick_challenger():
            if len(stats.queue) + stats.in_flight >= stats.cfg.max_shadow_in_flight:
                stats.skipped += 1
            else:
                stats.queue.append((body, content_type, own))
                if len(stats.queue) == 1 and not stats.in_flight:  # no sender running: start one
                    task = asyncio.get_running_loop().create_task(self._send_shadows(stats))
                    _BACKGROUND.add(task)
                    task.add_done_callback(_BACKGROUND.discard)
        return Response(own, media_type=_JSON, headers=self.version_header)

    async def _send_shadows(self, stats: RolloutStats) -> None:
        """Copies go to the challenger in batches (one call for up to ``max_shadow_batch``): a call
        per request would cost the champion's replica as much as its own answers."""
        while stats.queue:
            await asyncio.sleep(stats.cfg.shadow_batch_wait_s)
            batch, stats.queue = stats.queue[: stats.cfg.max_shadow_batch], stats.queue[stats.cfg.max_shadow_batch :]
            stats.in_flight += len(batch)
            try:
                answers = await self._ask_challenger_many(stats, [(body, ct) for body, ct, _ in batch])
                for (_, _, own), answer in zip(batch, answers, strict=True):
                    stats.challenger_done(answer)
                    if answer["ok"]:
                        stats.compare(own, answer["body"])
            finally:
                stats.in_flight -= len(batch)

    async def score_many(self, requests: list[tuple[bytes, str]]) -> list[dict[str, Any]]:
        """``score`` of each request, at once (a batching model takes them in one forward pass)."""
        return list(await asyncio.gather(*(self.score(body, content_type) for body, content_type in requests)))

    async def _ask_challenger_many(
        self, stats: RolloutStats, requests: list[tuple[bytes, str]]
    ) -> list[dict[str, Any]]:
        try:
            if self._challenger_many is None:
                self._challenger_many = serve.get_app_handle(stats.cfg.challenger_app).options(method_name="score_many")
            return list(await self._challenger_many.remote(requests))
        except Exception as e:  # the challenger's app is gone or failing: its failure, counted
            failed = {"ok": False, "status": 503, "body": f"{type(e).__name__}: {e}".encode(), "seconds": 0.0}
            return [failed] * len(requests)

    async def _ask_challenger(self, stats: RolloutStats, body: bytes, content_type: str) -> dict[str, Any]:
        try:
            if self._challenger is None:
                self._challenger = serve.get_app_handle(stats.cfg.challenger_app).options(method_name="score")
            answer = await self._challenger.remote(body, content_type)
        except Exception as e:  # the challenger's app is gone or failing: its failure, counted
            answer = {"ok": False, "status": 503, "body": f"{type(e).__name__}: {e}".encode(), "seconds": 0.0}
        stats.challenger_done(answer)
        return answer
