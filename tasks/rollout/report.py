"""A rollout's comparison as an artifact: a table (champion beside challenger) and a chart."""

from __future__ import annotations

import io
from typing import Any

from tasks.rollout.policy import Decision, Rollout, Summary


def comparison_rows(summary: Summary) -> list[dict[str, Any]]:
    def fmt(value: float | None, unit: str = "") -> str:
        return "n/a" if value is None else f"{value:g}{unit}"

    agreement = summary.agreement
    return [
        {"measure": "requests from clients", "champion": str(summary.requests), "challenger": ""},
        {
            "measure": "calls (answered or copied)",
            "champion": str(summary.requests - summary.challenger_answered),
            "challenger": str(summary.challenger_calls),
        },
        {
            "measure": "errors",
            "champion": str(summary.champion_errors),
            "challenger": f"{summary.challenger_errors} ({summary.error_rate:.2%})",
        },
        {"measure": "p50 ms", "champion": fmt(summary.champion_p50_ms), "challenger": fmt(summary.challenger_p50_ms)},
        {"measure": "p99 ms", "champion": fmt(summary.champion_p99_ms), "challenger": fmt(summary.challenger_p99_ms)},
        {
            "measure": "agreement (rows)",
            "champion": "",
            "challenger": "n/a" if agreement is None else f"{summary.rows_agreeing}/{summary.rows_compared}",
        },
        {"measure": "shadow copies skipped (busy)", "champion": "", "challenger": str(summary.skipped)},
    ]


def markdown(rollout: Rollout, summary: Summary, decision: Decision, chart_png: bytes | None) -> str:
    import base64

    lines = [
        f"### {rollout.model_name}: {rollout.describe()}",
        "",
        f"**{decision.action}**: {decision.reason}",
        "",
        "| measure | champion " + rollout.champion_version + " | challenger " + rollout.challenger_version + " |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {r['measure']} | {r['champion']} | {r['challenger']} |" for r in comparison_rows(summary)]
    if chart_png:
        lines += ["", f"![latency](data:image/png;base64,{base64.b64encode(chart_png).decode()})"]
    return "\n".join(lines)


def latency_chart_png(rollout: Rollout, summary: Summary) -> bytes | None:
    """Grouped bars: p50 and p99 of champion and challenger (None before either has answered)."""
    if summary.champion_p50_ms is None or summary.challenger_p50_ms is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 2.6))
    xs = [0.0, 1.0]
    width = 0.38
    champion = [summary.champion_p50_ms, summary.champion_p99_ms or 0.0]
    challenger = [summary.challenger_p50_ms, summary.challenger_p99_ms or 0.0]
    ax.bar([x - width / 2 for x in xs], champion, width, label=f"champion v{rollout.champion_version}")
    ax.bar([x + width / 2 for x in xs], challenger, width, label=f"challenger v{rollout.challenger_version}")
    ax.set_xticks(xs, ["p50", "p99"])
    ax.set_ylabel("ms in the replica")
    ax.set_title(f"{rollout.model_name}: {rollout.mode}, {summary.challenger_calls} challenger calls", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return buffer.getvalue()
