"""What a PromQL expression reads: the metrics it selects, the labels it matches and groups by.

Enough of PromQL for checking our own rules and dashboard against the metric schema (names,
labels), not a parser: strings, ranges and grouping clauses are set aside, then every identifier
that is not a function, an aggregation or a keyword is a metric name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENTIFIER = re.compile(r"(?<![\w.:$])[a-zA-Z_:][\w:]*")
_MATCHER = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}
    | {"inf", "nan", "atan2"}
)


@dataclass(frozen=True)
class Selector:
    """One vector selector: ``metric{label="..."}``, with the label names it matches on."""

    metric: str
    labels: frozenset[str]


def selectors(expr: str) -> list[Selector]:
    """Every metric selector in ``expr``, in order (a metric selected twice appears twice)."""
    text = _RANGE.sub("", _GROUPING.sub("", _STRING.sub('""', expr)))
    found = []
    for match in _IDENTIFIER.finditer(text):
        name, rest = match.group(), text[match.end() :].lstrip()
        if name.lower() in _KEYWORDS or rest.startswith("(") or _inside_braces(text, match.start()):
            continue
        labels: frozenset[str] = frozenset()
        if rest.startswith("{"):
            labels = frozenset(_MATCHER.findall(rest[1 : rest.index("}")]))
        found.append(Selector(name, labels))
    return found


def grouping_labels(expr: str) -> set[str]:
    """The label names in ``by``, ``without``, ``on``, ``ignoring`` and ``group_*`` clauses."""
    text = _STRING.sub('""', expr)
    return {label.strip() for inner in _GROUPING.findall(text) for label in inner.split(",") if label.strip()}


def exposed_series(metrics: Iterable[tuple[str, str, Iterable[str]]]) -> dict[str, frozenset[str]]:
    """Series name -> label names, for metrics given as (name, kind, labels): what a scrape shows.

    A counter shows ``<name>_total`` (its name given with or without the suffix); a histogram
    ``<name>_bucket`` (with ``le``), ``_sum`` and ``_count``; a gauge its name.
    """
    series: dict[str, frozenset[str]] = {}
    for name, kind, labels in metrics:
        names = frozenset(labels)
        if kind == "counter":
            series[name if name.endswith("_total") else f"{name}_total"] = names
        elif kind == "histogram":
            series[f"{name}_bucket"] = names | {"le"}
            series[f"{name}_sum"] = series[f"{name}_count"] = names
        else:
            series[name] = names
    return series


def _inside_braces(text: str, position: int) -> bool:
    return text.rfind("{", 0, position) > text.rfind("}", 0, position)
