"""What nodewise has deployed: one JSON file in the state folder (``locked_json``: locked, replaced atomically)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from nodewise.core.state import StateFolder, locked_json, shared_json, wait_lock
from serving.spec import DeepSpeedSpec, ModelServeSpec


def app_name_for(model_name: str) -> str:
    """A registered model's deployment name: its Serve app and route prefix, its DeepSpeed job folder."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", model_name).strip("-.") or "model"
    return name if name[0].isalnum() else f"m{name}"


class DeploymentRecord(BaseModel):
    """One deployed model. ``backend`` names its backend (tasks/backends.py), whose room reads
    ``spec``: through ``serve_spec()`` / ``deepspeed_spec()``, typed, rather than by key."""

    app_name: str
    model_name: str
    model_version: str
    model_uri: str
    backend: str
    endpoint: str
    replicas: int
    plan: str
    spec: dict[str, Any]
    canary: dict[str, Any] | None = Field(
        default=None, description="The smoke test's request: the watchdog's canary inference."
    )
    deployed_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    previous_version: str | None = None
    previous_spec: dict[str, Any] | None = None
    replaced: str | None = Field(
        default=None, description="How this version took over from the previous one (a backend's own words)."
    )

    def serve_spec(self) -> ModelServeSpec:
        """``spec`` as the Ray Serve backend wrote it."""
        return ModelServeSpec.model_validate(self.spec)

    def deepspeed_spec(self) -> DeepSpeedSpec:
        """``spec`` as the DeepSpeed backend wrote it."""
        return DeepSpeedSpec.model_validate(self.spec)


def load_records(path: Path) -> dict[str, DeploymentRecord]:
    """Every recorded deployment, by Serve app name."""
    with shared_json(path) as data:
        return {k: DeploymentRecord.model_validate(v) for k, v in data.items()}


def get_record(path: Path, app_name: str) -> DeploymentRecord | None:
    return load_records(path).get(app_name)


def save_record(path: Path, record: DeploymentRecord) -> DeploymentRecord:
    """Record ``record``, keeping the version it replaces as ``previous``."""
    with locked_json(path) as data:
        old = data.get(record.app_name)
        if old is not None and old["model_version"] != record.model_version:
            record = record.model_copy(update={"previous_version": old["model_version"], "previous_spec": old["spec"]})
        elif old is not None:
            record = record.model_copy(
                update={"previous_version": old.get("previous_version"), "previous_spec": old.get("previous_spec")}
            )
        data[record.app_name] = record.model_dump(mode="json")
        return record


def remove_record(path: Path, app_name: str) -> bool:
    """Forget one deployment; whether it was recorded."""
    with locked_json(path) as data:
        return data.pop(app_name, None) is not None


def clear_records(path: Path) -> list[str]:
    with locked_json(path) as data:
        names = sorted(data)
        data.clear()
        return names


@contextlib.contextmanager
def deploy_lock(state: StateFolder, model_name: str, timeout_s: float = 3600.0) -> Iterator[None]:
    """One deploy of a model at a time on this machine (CLI, UI or promotion): the next one waits
    its turn, then deploys over what the first left, so both end with a consistent record."""
    what = f"another deploy of {model_name!r}"

    def waiting() -> None:
        print(f"{what} is running on this machine: this one waits for it, then deploys")

    with wait_lock(state.deploy_lock(model_name), timeout_s, what, on_wait=waiting):
        yield
