"""A challenger beside the champion, in the champion's replicas: shadow or canary traffic.

The champion's Serve app is told of a rollout through its ``user_config`` (Serve calls
``reconfigure`` on the running replicas: none restarts). Each champion replica then
- ``shadow``: answers every request itself and also sends it (all, or a sampled ``share``) to the
  challenger's app in the background; the client only ever sees the champion's answer;
- ``canary``: has the challenger answer a ``share`` of requests (the champion answers when the
  challenger fails, so a client never sees the challenger's failure; it is counted).
Either way the replica records both sides' latency (time in each replica, queueing and batching
included, not the hop between them), the challenger's errors, and in shadow mode how often the two
agree. The decision flow (tasks/rollout/) reads these from every replica.

Plain Python and numpy: no Prefect, no nodewise outside ``serving/``.
"""

from __future__ import annotations

import random
from collections import deque
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from serving.errors import decode_json

KEEP_LATENCIES = 5000  # per replica and side: enough for a p99 over the decision's window
KEEP_EXAMPLES = 3


class RolloutConfig(BaseModel):
    """What a champion replica does with a challenger (its deployment's ``user_config["rollout"]``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["shadow", "canary"]
    share: float = Field(gt=0.0, le=1.0, description="shadow: share of requests copied; canary: share answered.")
    challenger_app: str = Field(description="The challenger's Serve app (answers ``score`` calls).")
    challenger_version: str
    epoch: str = Field(description="Stats restart when it changes (a new rollout, or a canary step).")
    compare: Literal["class", "allclose", "distance"] = "allclose"
    rtol: float = Field(default=1e-3, ge=0.0)
    atol: float = Field(default=1e-5, ge=0.0)
    max_distance: float = Field(default=0.1, ge=0.0, description="compare=distance: most mean |a-b| per row.")
    max_shadow_in_flight: int = Field(
        default=256, gt=0, description="Shadow copies queued or sent past this are skipped."
    )
    max_shadow_batch: int = Field(default=64, gt=0, description="Copies sent to the challenger in one call.")
    shadow_batch_wait_s: float = Field(default=0.005, ge=0.0, description="How long copies gather before a call.")


def agreement(champion: Any, challenger: Any, cfg: RolloutConfig) -> tuple[int, int]:
    """(rows that agree, rows compared) of two answers' ``predictions``."""
    try:
        a, b = np.asarray(champion), np.asarray(challenger)
    except ValueError:  # ragged: compare as values
        return (1, 1) if champion == challenger else (0, 1)
    rows = a.shape[0] if a.ndim else 1
    # another shape agrees nowhere, but for classes of one row each (labels beside scores)
    same_rows = cfg.compare == "class" and a.ndim >= 1 and b.ndim >= 1 and a.shape[0] == b.shape[0]
    if a.shape != b.shape and not same_rows:
        return 0, rows
    numeric = a.dtype.kind in "biuf" and b.dtype.kind in "biuf"
    if cfg.compare == "class":
        ca, cb = _classes(a), _classes(b)
        return int(np.sum(_rows(ca == cb))), rows
    if not numeric:
        return int(np.sum(_rows(a == b))), rows
    a, b = a.astype(np.float64), b.astype(np.float64)
    if cfg.compare == "distance":
        distance = np.abs(a - b).reshape(rows, -1).mean(axis=1) if a.ndim else np.abs(a - b).reshape(1)
        return int(np.sum(distance <= cfg.max_distance)), rows
    return int(np.sum(_rows(np.isclose(a, b, rtol=cfg.rtol, atol=cfg.atol)))), rows


def _classes(values: np.ndarray) -> np.ndarray:
    """A row's class: the argmax of a row of scores, or the value itself (labels)."""
    if values.ndim >= 2 and values.dtype.kind in "biuf":
        return values.reshape(values.shape[0], -1).argmax(axis=1)
    return values


def _rows(equal: Any) -> np.ndarray:
    """Per row: every element equal."""
    equal = np.asarray(equal)
    if equal.ndim == 0:
        return equal.reshape(1)
    return equal.reshape(equal.shape[0], -1).all(axis=1)


def predictions_of(body: bytes) -> Any:
    return decode_json(body)["predictions"]


class RolloutStats:
    """What one champion replica saw of one rollout epoch."""

    def __init__(self, cfg: RolloutConfig) -> None:
        self.cfg = cfg
        self.requests = 0  # answered by this replica while the rollout ran (clients' requests)
        self.champion_errors = 0
        self.champion_latency: deque[float] = deque(maxlen=KEEP_LATENCIES)
        self.challenger_calls = 0
        self.challenger_answered = 0  # canary: answers clients got from the challenger
        self.challenger_errors = 0
        self.challenger_latency: deque[float] = deque(maxlen=KEEP_LATENCIES)
        self.rows_compared = 0
        self.rows_agreeing = 0
        self.skipped = 0  # shadow copies not sent: too many in flight
        self.in_flight = 0  # shadow copies sent, not yet answered
        self.queue: list[tuple[bytes, str, bytes]] = []  # shadow copies waiting for the next call
        self.errors: deque[str] = deque(maxlen=KEEP_EXAMPLES)
        self.disagreements: deque[str] = deque(maxlen=KEEP_EXAMPLES)

    def pick_challenger(self) -> bool:
        """Whether this request goes to the challenger (canary) or is copied to it (shadow)."""
        return random.random() < self.cfg.share

    def champion_done(self, seconds: float, ok: bool) -> None:
        self.requests += 1
        if ok:
            self.champion_latency.append(seconds)
        else:
            self.champion_errors += 1

    def challenger_done(self, answer: dict[str, Any]) -> None:
        self.challenger_calls += 1
        if answer["ok"]:
            self.challenger_latency.append(answer["seconds"])
        else:
            self.challenger_errors += 1
            detail = answer.get("detail") or answer["body"][:200].decode("utf-8", "replace")
            self.errors.append(f"{answer['status']}: {detail}")

    def compare(self, champion_body: bytes, challenger_body: bytes) -> None:
        try:
            agreeing, rows = agreement(predictions_of(champion_body), predictions_of(challenger_body), self.cfg)
        except (ValueError, KeyError, TypeError) as e:
            self.rows_compared += 1
            self.disagreements.append(f"not comparable: {type(e).__name__}: {e}"[:200])
            return
        self.rows_compared += rows
        self.rows_agreeing += agreeing
        if agreeing < rows:
            self.disagreements.append(
                f"champion {champion_body[:80].decode('utf-8', 'replace')} / "
                f"challenger {challenger_body[:80].decode('utf-8', 'replace')}"
            )

    def snapshot(self) -> dict[str, Any]:
        return {
            "epoch": self.cfg.epoch,
            "mode": self.cfg.mode,
            "share": self.cfg.share,
            "challenger_version": self.cfg.challenger_version,
            "requests": self.requests,
            "champion_errors": self.champion_errors,
            "champion_latency_s": list(self.champion_latency),
            "challenger_calls": self.challenger_calls,
            "challenger_answered": self.challenger_answered,
            "challenger_errors": self.challenger_errors,
            "challenger_latency_s": list(self.challenger_latency),
            "rows_compared": self.rows_compared,
            "rows_agreeing": self.rows_agreeing,
            "skipped": self.skipped,
            "errors": list(self.errors),
            "disagreements": list(self.disagreements),
        }
