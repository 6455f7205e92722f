"""Where a rollout is kept: ``<state>/rollouts.json`` (one per model), and the registry (its aliases,
the ``nodewise.rollout.*`` tags), and the rules a model's tags set for it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nodewise.core.settings import RolloutSettings
from nodewise.core.state import locked_json, read_json
from tasks.planning.registry import ResolvedModel
from tasks.planning.serve_config import settings_from_tags
from tasks.rollout.policy import TAG, Rollout

# The tags a model may set (nodewise.rollout.<field>), and those nodewise writes back.
RULES = tuple(f for f in RolloutSettings.model_fields if f not in ("challenger_alias", "every_s"))
RESULTS = frozenset(
    {"status", "champion", "mode_used", "share_used", "updated_at", "reason", "calls", "error_rate"}
    | {"p99_ratio", "agreement", "decision"}
)


def rules_for(model: ResolvedModel, base: RolloutSettings) -> RolloutSettings:
    """``base`` with the model's ``nodewise.rollout.*`` tags applied (the challenger version's win)."""
    merged, _ = settings_from_tags(model, TAG, base, RULES, ignore=RESULTS)
    if merged.mode == "shadow" and len(merged.share) > 1:
        from nodewise.core.errors import InvalidServeOverride

        raise InvalidServeOverride(
            f"{model.pinned_uri}: shadow mode takes one share (the copied share of requests), not the steps "
            f"{merged.share}; set nodewise.rollout.share to one value, or nodewise.rollout.mode=canary"
        )
    return merged


# -- the state file ---------------------------------------------------------------------------------
def load(path: Path) -> dict[str, Rollout]:
    return {name: Rollout.model_validate(value) for name, value in read_json(path).items()}


def get(path: Path, model_name: str) -> Rollout | None:
    return load(path).get(model_name)


def save(path: Path, rollout: Rollout) -> Rollout:
    with locked_json(path) as data:
        data[rollout.model_name] = rollout.model_dump(mode="json")
    return rollout


def count_outcome(metrics_dir: Path, model_name: str, outcome: str) -> None:
    """A rollout ended (``promoted``, ``rolled_back``, ``failed``): counted for the metrics."""
    from tasks.metrics.counts import bump

    bump(metrics_dir / "counts.json", "rollouts", {"model": model_name, "outcome": outcome})


def forget(path: Path, model_name: str) -> None:
    with locked_json(path) as data:
        data.pop(model_name, None)


# -- the registry -----------------------------------------------------------------------------------
def alias_version(client: Any, model_name: str, alias: str) -> str | None:
    """The version ``alias`` points at, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(model_name, alias).version)
    except MlflowException:
        return None


def delete_alias_if(client: Any, model_name: str, alias: str, version: str) -> None:
    """Remove ``alias`` if it still points at ``version`` (moved meanwhile: left as it is)."""
    if alias_version(client, model_name, alias) == version:
        client.delete_registered_model_alias(model_name, alias)


def set_tags(client: Any, model_name: str, version: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
