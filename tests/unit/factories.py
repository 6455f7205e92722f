"""Plain objects the unit tests build often."""

from __future__ import annotations

from tasks.planning.registry import ResolvedModel


def resolved_model(**fields: object) -> ResolvedModel:
    """A registered model version as resolve_model returns it (no registry needed)."""
    values: dict = {
        "name": "m",
        "version": "1",
        "alias": None,
        "pinned_uri": "models:/m/1",
        "artifact_uri": "file:///nowhere",
        "run_id": None,
        "flavors": ["python_function"],
        "flavor": "python_function",
        "artifact_bytes": 1,
    }
    return ResolvedModel(**{**values, **fields})
