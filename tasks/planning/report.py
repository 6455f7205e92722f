"""The placement report: a table and a bar chart of the memory breakdown, as Prefect artifacts."""

from __future__ import annotations

import io
from typing import Any

from tasks.planning.placement import PlacementPlan
from tasks.planning.profiling import MemoryProfile

MIB = 1024**2


def breakdown_rows(profile: MemoryProfile, plan: PlacementPlan) -> list[dict[str, Any]]:
    """One row per component of one replica (or rank), in MiB, plus the device budget."""
    per_rank = plan.tp_size
    rows = [
        {"component": "weights", "MiB": round(profile.weight_bytes / per_rank / MIB, 1)},
        {
            # the generation engine holds at most these tokens at once (its budget is this count)
            "component": f"kv cache ({profile.kv_tokens} tokens in flight)" if profile.kv_tokens else "kv cache",
            "MiB": round(profile.kv_bytes_per_rank(per_rank) / MIB, 1),
        },
        {"component": "activations", "MiB": round(profile.activation_bytes / MIB, 1)},
        {"component": "runtime", "MiB": round(profile.runtime_bytes / MIB, 1)},
    ]
    if profile.load_copy_bytes:
        rows.insert(3, {"component": "copy while loading", "MiB": round(profile.load_copy_bytes / MIB, 1)})
    if profile.measured_bytes is not None:
        rows.append({"component": "measured (model, not runtime)", "MiB": round(profile.measured_bytes / MIB, 1)})
    rows += [
        {"component": "needed per replica/rank", "MiB": round(plan.needed_bytes / MIB, 1)},
        {"component": "usable per device", "MiB": round(plan.budget_bytes / MIB, 1)},
    ]
    return rows


def bar_chart_png(rows: list[dict[str, Any]], title: str) -> bytes:
    """A horizontal bar chart of ``rows`` as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 0.45 * len(rows) + 1))
    ax.barh([r["component"] for r in rows][::-1], [r["MiB"] for r in rows][::-1], color="#4c72b0")
    ax.set_xlabel("MiB")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return buffer.getvalue()
