"""What a DeepSpeed deployment's front did for its clients between two watchdog passes.

The front (serving/front.py) counts, since it started, the requests it held while the group was
down, those it sent again after the group died, the streams it continued on a new group and the
requests it answered 503 (held past ``hold_timeout_s``, or the hold full); ``GET /front`` gives
them as ``counts``. Each pass compares them with what the last pass saw and reports any growth as
one ``nodewise.front.held`` action, so what a restart, an upgrade or a partition cost the clients
is on record (an event, the watchdog's history, the metrics' action count) beside the restart.
"""

from __future__ import annotations

from typing import Any

from nodewise.core.settings import Settings

COUNTS = ("held", "retried", "continued", "refused")


def front_counts(settings: Settings, app_name: str) -> tuple[dict[str, int] | None, str]:
    """The app's front's counts and why it holds now ("" while it serves); None without a front answering."""
    from tasks.mpi.front import front_state, read_front

    front = read_front(settings, app_name)
    state = front_state(front) if front is not None else None
    if state is None or not isinstance(state.get("counts"), dict):
        return None, ""
    counts = {k: int(state["counts"].get(k, 0)) for k in COUNTS}
    return counts, "" if state.get("ready") else str(state.get("why") or "group not ready")


def grown(now: dict[str, int], seen: dict[str, int]) -> dict[str, int]:
    """What grew since ``seen``; a front that started again counts from zero (its totals fell)."""
    if any(now.get(k, 0) < seen.get(k, 0) for k in COUNTS):
        seen = {}
    return {k: now.get(k, 0) - seen.get(k, 0) for k in COUNTS}


def held_sentence(delta: dict[str, int], holding: str) -> str:
    """``the front held 12 requests, sent 3 again, continued 2 streams; holding now: group restarting``."""
    parts = [f"held {delta['held']} requests", f"sent {delta['retried']} again"]
    parts.append(f"continued {delta['continued']} streams")
    if delta["refused"]:
        parts.append(f"answered {delta['refused']} with 503 (hold timeout or full)")
    return "the front " + ", ".join(parts) + (f"; holding now: {holding}" if holding else "")


def front_report(settings: Settings, app_name: str, seen: dict[str, int]) -> tuple[dict[str, int], dict[str, Any]]:
    """(the counts to remember, the action's fields or {} when nothing grew) for one pass."""
    now, holding = front_counts(settings, app_name)
    if now is None:
        return seen, {}  # no front, or it does not answer: keep what was seen, report nothing
    delta = grown(now, seen)
    if not any(delta.values()):
        return now, {}
    return now, {"cause": held_sentence(delta, holding), "counts": delta, "target": "front"}
