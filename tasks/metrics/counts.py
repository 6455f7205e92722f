"""The control plane's counters, kept in ``<state>/prometheus/counts.json`` so that they only go up.

The watchdog's action list and the promotions' history keep their last 50 entries; a counter read
from them would fall when an old entry leaves. Each event that a counter counts bumps it here as it
happens (a locked read-modify-write), and the exporter reads the file at every scrape.

Labels are bounded: a watchdog action's free-text cause is reduced to one of ``CAUSES``.
"""

from __future__ import annotations

import re
from pathlib import Path

from nodewise.core.state import locked_json, read_json

CAUSES = ("hung", "failing", "memory", "exited", "unhealthy", "unplaceable", "node_lost", "other")
# First match wins: the watchdog's own wordings (tasks/mpi/watch.py, tasks/rayserve/watch.py, tasks/k8s/backend.py).
_CAUSE_PATTERNS = (
    ("node_lost", r"dead node|host .*down|hosts? (are|is) down|unreachable host|no route to host|node .*lost"),
    ("hung", r"took over|hung|no token within|timed? ?out"),
    ("memory", r"memory|\boom\b|oomkilled"),
    ("exited", r"exited|no job is running|crashloop|terminated|killed"),
    ("unplaceable", r"replicas running|to be scheduled|pending|unschedulable|not enough|insufficient"),
    ("failing", r"failed|answered http|error"),
    ("unhealthy", r"heartbeat|not ready|unhealthy|does not answer|health"),
)


def cause_class(cause: str) -> str:
    """A watchdog cause (free text) as one of ``CAUSES``: what a label may hold."""
    text = cause.lower().removeprefix("was: ")
    for name, pattern in _CAUSE_PATTERNS:
        if re.search(pattern, text):
            return name
    return "other"


def action_kind(event: str) -> str:
    """``nodewise.replica.restarted`` -> ``replica_restarted``, ``nodewise.deployment.degraded`` -> ``degraded``."""
    _, what, verb = [*event.split("."), "", ""][:3]
    return verb if what == "deployment" else f"{what}_{verb}"


def bump(path: Path, family: str, labels: dict[str, str], by: float = 1.0) -> None:
    """Add ``by`` to the counter ``family`` with ``labels`` (kept sorted: one key per label set)."""
    key = "|".join(f"{k}={labels[k]}" for k in sorted(labels))
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked_json(path) as data:
        counters = data.setdefault(family, {})
        counters[key] = counters.get(key, 0) + by


def set_last(path: Path, family: str, labels: dict[str, str], value: float) -> None:
    """Keep ``value`` as the last of ``family`` with ``labels`` (a gauge: the last restart's duration)."""
    key = "|".join(f"{k}={labels[k]}" for k in sorted(labels))
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked_json(path) as data:
        data.setdefault(family, {})[key] = value


def read(path: Path) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every counter: family -> [(labels, value)]."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family, counters in read_json(path).items():
        for key, value in counters.items():
            labels = dict(part.split("=", 1) for part in key.split("|") if part)
            out.setdefault(family, []).append((labels, float(value)))
    return out
