"""What a rollout is, what its replicas saw, and what to do about it: plain functions and models.

A rollout (one per model at a time) is kept in ``<state>/rollouts.json`` from the moment the
challenger starts until the decision on it is carried out to the end, so that a decision flow
killed half-way finishes the same decision when it runs again.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from nodewise.core.settings import RolloutSettings
from serving.rollout import RolloutConfig

Action = Literal["wait", "advance", "promote", "rollback"]
TAG = "nodewise.rollout."


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Decision(BaseModel):
    action: Action
    reason: str
    at: str = Field(default_factory=now)


class Rollout(BaseModel):
    """One model's challenger beside its champion."""

    model_name: str
    app_name: str  # the champion's Serve app
    challenger_app: str
    champion_version: str
    challenger_version: str
    mode: Literal["shadow", "canary"]
    shares: list[float]
    step: int = 0
    epoch: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])
    rules: RolloutSettings
    inventory: str = "local"  # where a promotion deploys the challenger's version
    started_at: str = Field(default_factory=now)
    step_started_at: str = Field(default_factory=now)
    phase: Literal["running", "promoting", "rolling_back"] = "running"
    decision: Decision | None = None  # once taken, carried out to the end (even by a later run)
    last: dict[str, Any] | None = None  # the last pass's summary and verdict

    @property
    def share(self) -> float:
        return self.shares[self.step]

    def describe(self) -> str:
        what = f"{self.share:.0%} of requests"
        if self.mode == "canary" and len(self.shares) > 1:
            what += f" (step {self.step + 1} of {len(self.shares)})"
        return f"version {self.challenger_version} in {self.mode} mode beside {self.champion_version}: {what}"

    def config(self) -> RolloutConfig:
        """What the champion's replicas are told (their ``user_config``)."""
        return RolloutConfig(
            mode=self.mode,
            share=self.share,
            challenger_app=self.challenger_app,
            challenger_version=self.challenger_version,
            epoch=f"{self.epoch}-{self.step}",
            compare=self.rules.compare,
            rtol=self.rules.rtol,
            atol=self.rules.atol,
            max_distance=self.rules.max_distance,
        )


class Summary(BaseModel):
    """Every champion replica's stats of the current epoch, added up."""

    replicas: int = 0
    requests: int = 0  # clients' requests while the rollout ran
    challenger_calls: int = 0
    challenger_answered: int = 0  # canary: answers clients got from the challenger
    challenger_errors: int = 0
    champion_errors: int = 0
    skipped: int = 0
    rows_compared: int = 0
    rows_agreeing: int = 0
    champion_p50_ms: float | None = None
    champion_p99_ms: float | None = None
    challenger_p50_ms: float | None = None
    challenger_p99_ms: float | None = None
    errors: list[str] = []
    disagreements: list[str] = []

    @property
    def error_rate(self) -> float:
        return self.challenger_errors / self.challenger_calls if self.challenger_calls else 0.0

    @property
    def agreement(self) -> float | None:
        return self.rows_agreeing / self.rows_compared if self.rows_compared else None

    @property
    def p99_ratio(self) -> float | None:
        if not self.champion_p99_ms or self.challenger_p99_ms is None:
            return None
        return self.challenger_p99_ms / self.champion_p99_ms

    @property
    def observed_share(self) -> float | None:
        """Canary: the share of clients' requests the challenger answered."""
        return self.challenger_answered / self.requests if self.requests else None


def summarize(snapshots: list[dict[str, Any]], epoch: str) -> Summary:
    """Add up the replicas' ``rollout_stats`` of ``epoch`` (others are from before a change)."""
    mine = [s for s in snapshots if s and s.get("epoch") == epoch]
    total = Summary(replicas=len(mine))
    champion: list[float] = []
    challenger: list[float] = []
    for s in mine:
        for field in (
            "requests",
            "challenger_calls",
            "challenger_answered",
            "challenger_errors",
            "champion_errors",
            "skipped",
            "rows_compared",
            "rows_agreeing",
        ):
            setattr(total, field, getattr(total, field) + int(s.get(field, 0)))
        champion += s.get("champion_latency_s", [])
        challenger += s.get("challenger_latency_s", [])
        total.errors += s.get("errors", [])
        total.disagreements += s.get("disagreements", [])
    if champion:
        total.champion_p50_ms, total.champion_p99_ms = _percentiles_ms(champion)
    if challenger:
        total.challenger_p50_ms, total.challenger_p99_ms = _percentiles_ms(challenger)
    total.errors, total.disagreements = total.errors[:3], total.disagreements[:3]
    return total


def _percentiles_ms(seconds: list[float]) -> tuple[float, float]:
    p50, p99 = np.percentile(np.asarray(seconds) * 1000.0, [50, 99])
    return round(float(p50), 3), round(float(p99), 3)


def decide(rollout: Rollout, summary: Summary) -> Decision:
    """Wait for enough calls, then roll back on the first rule broken, else advance (a canary with
    steps left) or promote."""
    rules = rollout.rules
    if summary.challenger_calls < rules.min_requests:
        return Decision(
            action="wait",
            reason=f"{summary.challenger_calls} of the {rules.min_requests} challenger calls needed "
            f"(nodewise.rollout.min_requests) so far",
        )
    calls = f"over {summary.challenger_calls} calls"
    if summary.error_rate > rules.max_error_rate:
        example = f"; e.g. {summary.errors[0]}" if summary.errors else ""
        return Decision(
            action="rollback",
            reason=f"error rate {summary.error_rate:.1%} > {rules.max_error_rate:.1%} {calls}{example}",
        )
    ratio = summary.p99_ratio
    if ratio is not None and ratio > rules.max_p99_ratio:
        return Decision(
            action="rollback",
            reason=f"p99 latency {summary.challenger_p99_ms:.1f} ms is {ratio:.2f}x the champion's "
            f"{summary.champion_p99_ms:.1f} ms > {rules.max_p99_ratio}x {calls}",
        )
    agreement = summary.agreement
    if rollout.mode == "shadow" and agreement is not None and agreement < rules.min_agreement:
        example = f"; e.g. {summary.disagreements[0]}" if summary.disagreements else ""
        return Decision(
            action="rollback",
            reason=f"agreement {agreement:.1%} < {rules.min_agreement:.1%} ({rules.compare}) over "
            f"{summary.rows_compared} rows{example}",
        )
    passed = f"error rate {summary.error_rate:.1%}, p99 ratio {_ratio(ratio)}" + (
        f", agreement {agreement:.1%}" if agreement is not None else ""
    )
    if rollout.mode == "canary" and rollout.step + 1 < len(rollout.shares):
        nxt = rollout.shares[rollout.step + 1]
        return Decision(action="advance", reason=f"{passed} {calls} at {rollout.share:.0%}: on to {nxt:.0%}")
    return Decision(action="promote", reason=f"{passed} {calls}")


def _ratio(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}"


def tags_for(rollout: Rollout, status: str, summary: Summary | None, reason: str | None) -> dict[str, str]:
    """The ``nodewise.rollout.*`` tags written on the challenger's version (the registry UI shows them)."""
    tags = {
        f"{TAG}status": status,
        f"{TAG}champion": rollout.champion_version,
        f"{TAG}mode_used": rollout.mode,
        f"{TAG}share_used": f"{rollout.share:g}",
        f"{TAG}updated_at": now(),
    }
    if reason is not None:
        tags[f"{TAG}reason"] = reason[:4900]  # MLflow keeps a tag value up to 5000 characters
    if summary is not None:
        tags[f"{TAG}calls"] = str(summary.challenger_calls)
        tags[f"{TAG}error_rate"] = f"{summary.error_rate:.4f}"
        if summary.p99_ratio is not None:
            tags[f"{TAG}p99_ratio"] = f"{summary.p99_ratio:.3f}"
        if summary.agreement is not None:
            tags[f"{TAG}agreement"] = f"{summary.agreement:.4f}"
    return tags
