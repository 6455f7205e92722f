"""The Grafana dashboard's queries, ready to run against a Prometheus (deployments/grafana)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Grafana's variables, as a query outside Grafana needs them: every model, a one-minute rate.
SUBSTITUTIONS = {
    "${model}": ".+",
    "$model": ".+",
    "${__rate_interval}": "1m",
    "$__rate_interval": "1m",
}


def panel_queries(path: str | Path) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel in the dashboard at ``path``.

    Grafana's variables are replaced (``$model`` by ``.+``, ``$__rate_interval`` by ``1m``) so
    that each query runs as it is on Prometheus' HTTP API. Rows are walked into.

    Raises:
        ValueError: a panel has no query, or a query still holds a variable after substitution.
    """
    dashboard = json.loads(Path(path).read_text())
    queries = []
    for panel in _panels(dashboard.get("panels", [])):
        exprs = [target["expr"] for target in panel.get("targets", []) if target.get("expr")]
        if not exprs:
            raise ValueError(f"panel {panel.get('title')!r} of {path} has no query: give it a target with an expr")
        for expr in exprs:
            for variable, value in SUBSTITUTIONS.items():
                expr = expr.replace(variable, value)
            if "$" in expr:
                raise ValueError(f"panel {panel['title']!r} uses a variable other than $model or $__rate_interval")
            queries.append((panel["title"], expr))
    return queries


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every panel that is not a row, including those a collapsed row holds."""
    found = []
    for panel in panels:
        if panel.get("type") == "row":
            found += _panels(panel.get("panels", []))
        else:
            found.append(panel)
    return found
