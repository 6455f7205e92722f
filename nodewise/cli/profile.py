"""`nodewise profile`: profile a registered model or a bare config, and plan it against an inventory."""

from __future__ import annotations

from typing import Any

from nodewise.core.settings import Settings
from tasks.planning.plan import plan_model


def profile_and_plan(
    model: str,
    inventory: str,
    settings: Settings,
    *,
    dtype: str | None = None,
    batch_size: int = 1,
    seq_len: int | None = None,
    measure: bool = True,
) -> dict[str, Any]:
    """Profile ``model`` (a models:/ URI or a config JSON) and plan it on ``inventory`` (nothing cached)."""
    planned = plan_model(
        model, inventory, settings, batch_size=batch_size, dtype=dtype, seq_len=seq_len, measure=measure, cached=False
    )
    profile = planned.profile
    return {
        "model": planned.name,
        "method": profile.method,
        "param_count": profile.param_count,
        "dtype": profile.dtype,
        "breakdown_bytes": {**profile.breakdown(), "total": profile.total_bytes},
        "inventory": planned.nodes.source,
        "plan": planned.plan.model_dump(mode="json"),
    }
