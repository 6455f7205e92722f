"""What nodewise has deployed: one JSON file in the state folder, written atomically under a lock."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field


class DeploymentRecord(BaseModel):
    """One deployed model."""

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


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    return json.loads(path.read_text() or "{}")


def _write(path: Path, data: dict[str, dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def load_records(path: Path) -> dict[str, DeploymentRecord]:
    """Every recorded deployment, by Serve app name."""
    with _locked(path):
        return {k: DeploymentRecord.model_validate(v) for k, v in _read(path).items()}


def get_record(path: Path, app_name: str) -> DeploymentRecord | None:
    return load_records(path).get(app_name)


def save_record(path: Path, record: DeploymentRecord) -> DeploymentRecord:
    """Record ``record``, keeping the version it replaces as ``previous``."""
    with _locked(path):
        data = _read(path)
        old = data.get(record.app_name)
        if old is not None and old["model_version"] != record.model_version:
            record = record.model_copy(update={"previous_version": old["model_version"], "previous_spec": old["spec"]})
        elif old is not None:
            record = record.model_copy(
                update={"previous_version": old.get("previous_version"), "previous_spec": old.get("previous_spec")}
            )
        data[record.app_name] = record.model_dump(mode="json")
        _write(path, data)
        return record


def remove_record(path: Path, app_name: str) -> bool:
    """Forget one deployment; whether it was recorded."""
    with _locked(path):
        data = _read(path)
        found = data.pop(app_name, None) is not None
        _write(path, data)
        return found


def clear_records(path: Path) -> list[str]:
    with _locked(path):
        names = sorted(_read(path))
        _write(path, {})
        return names


@task(name="record-deployment", cache_policy=NO_CACHE)
def record_deployment_task(path: Path, record: DeploymentRecord) -> DeploymentRecord:
    """Record what is now deployed."""
    return save_record(path, record)
