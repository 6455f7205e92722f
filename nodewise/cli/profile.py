"""`nodewise profile`: profile a registered model or a bare config, and plan it against an inventory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nodewise.core.errors import InvalidModelConfig
from nodewise.core.settings import Settings
from tasks.planning.inventory_sources import read_inventory
from tasks.planning.placement import plan_placement
from tasks.planning.profile_models import _cuda_here, profile_registered
from tasks.planning.profiling import dtype_bytes, load_config, profile_config
from tasks.planning.registry import make_client, resolve_model


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
    """Profile ``model`` (a models:/ URI or a config JSON) and plan it on ``inventory``."""
    if dtype is not None:
        dtype_bytes(dtype)  # fail fast on an unknown dtype, before any work
    nodes = read_inventory(inventory, settings.ray.num_cpus).require_nodes()
    if model.startswith("models:/"):
        resolved = resolve_model(model, make_client(settings.tracking_uri, settings.registry_uri))
        device = nodes.device_class if nodes.device_class == "cpu" or _cuda_here() else "cpu"
        profile = profile_registered(resolved, dtype=dtype, batch_size=batch_size, measured=measure, device=device)
        name = resolved.pinned_uri
    elif model.endswith(".json") or Path(model).is_dir():
        profile = profile_config(
            load_config(model), dtype=dtype, batch_size=batch_size, seq_len=seq_len, device=nodes.device_class
        )
        name = model
    else:
        raise InvalidModelConfig(
            f"{model!r} is neither a models:/ URI nor a config JSON; use models:/NAME@ALIAS, "
            "models:/NAME/VERSION, or a path to a transformers config.json"
        )
    plan = plan_placement(
        profile, nodes, headroom_fraction=settings.placement.headroom_fraction, desired_replicas=settings.serve.replicas
    )
    return {
        "model": name,
        "method": profile.method,
        "param_count": profile.param_count,
        "dtype": profile.dtype,
        "breakdown_bytes": {**profile.breakdown(), "total": profile.total_bytes},
        "inventory": nodes.source,
        "plan": plan.model_dump(mode="json"),
    }
