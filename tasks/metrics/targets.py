"""Scrape targets for Prometheus' file-based service discovery, kept under ``<state>/prometheus/targets/``.

- ``serving/<app>.json``: one target group per Ray Serve replica (its own ``/metrics`` port), or
  DeepSpeed's rank 0 (its serving port, path ``/metrics``), labelled ``app`` and ``backend`` (and
  ``replica`` for a replica).
- ``control/control.json``: the control-plane exporter (``nodewise up``).

Prometheus re-reads the files when they change (``file_sd_configs``; the example config is
``deployments/prometheus/prometheus.yml``). Who writes them: a deploy (its app's file), every
watchdog pass (each Ray Serve replica answers its vitals with its metrics address, so a replaced
replica is followed within a pass), the exporter (DeepSpeed groups from their records at each
refresh, itself, and the removal of what is no longer deployed). Files are replaced atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from nodewise.core.settings import Settings
from nodewise.core.state import atomic_write
from tasks.records import DeploymentRecord, load_records


def serving_dir(settings: Settings) -> Path:
    return settings.state.prometheus / "targets" / "serving"


def control_file(settings: Settings) -> Path:
    return settings.state.prometheus / "targets" / "control" / "control.json"


def _write(path: Path, groups: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(groups, indent=2, sort_keys=True)
    try:
        if path.read_text() == text:
            return  # unchanged: Prometheus is not made to reload for nothing
    except OSError:
        pass
    atomic_write(path, text)


def _labels(record: DeploymentRecord) -> dict[str, str]:
    """Target labels: not ``model``/``version``, which the scraped series carry themselves (a target
    label of the same name would rename theirs to ``exported_model``)."""
    return {"app": record.app_name, "backend": record.backend}


def write_targets(settings: Settings, record: DeploymentRecord, targets: dict[str | None, str | None]) -> None:
    """``record``'s scrape targets: replica id (None: the deployment's one target, such as DeepSpeed's
    rank 0) -> its metrics ``host:port``, or None where it did not say this time (a hung replica
    keeps the address it had: Prometheus shows it down, not gone)."""
    path = serving_dir(settings) / f"{record.app_name}.json"
    known = {g["labels"].get("replica"): g["targets"][0] for g in _read_groups(path) if g.get("targets")}
    groups = []
    for replica_id, address in sorted(targets.items(), key=lambda item: item[0] or ""):
        address = address or known.get(replica_id)
        if address:
            labels = {**_labels(record), "replica": replica_id} if replica_id is not None else _labels(record)
            groups.append({"targets": [address], "labels": labels})
    _write(path, groups)


def write_deepspeed_target(settings: Settings, record: DeploymentRecord, endpoint: str) -> None:
    """``record``'s rank 0: its serving address (``endpoint``, a URL), metrics at ``/metrics``."""
    write_targets(settings, record, {None: urlsplit(endpoint).netloc})


def write_control_target(settings: Settings, address: str) -> None:
    _write(control_file(settings), [{"targets": [address], "labels": {"component": "control-plane"}}])


def remove_targets(settings: Settings, app_name: str) -> None:
    (serving_dir(settings) / f"{app_name}.json").unlink(missing_ok=True)


def refresh(settings: Settings) -> None:
    """What needs no cluster call: each deployment's targets its backend knows from the state folder
    (a restarted DeepSpeed group may have moved hosts), and no file left for an app that is no
    longer deployed."""
    from tasks.backends import backend_for

    records = load_records(settings.state.records)
    for record in records.values():
        found = backend_for(record.backend).scrape_targets(settings, record, deployed=False)
        if found is not None:
            write_targets(settings, record, found)
    folder = serving_dir(settings)
    if folder.is_dir():
        for path in folder.glob("*.json"):
            if path.stem not in records:
                path.unlink(missing_ok=True)


def publish_targets(settings: Settings, record: DeploymentRecord) -> None:
    """``record``'s scrape targets right after its deploy (a Ray Serve deploy is connected to its cluster)."""
    from tasks.backends import backend_for

    if not record.spec.get("metrics", True):
        remove_targets(settings, record.app_name)
        return
    found = backend_for(record.backend).scrape_targets(settings, record, deployed=True)
    if found is not None:
        write_targets(settings, record, found)


def _read_groups(path: Path) -> list[dict[str, Any]]:
    try:
        groups = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return groups if isinstance(groups, list) else []


def read_targets(settings: Settings) -> dict[str, list[dict[str, Any]]]:
    """Every target file: its name -> its groups (for status and tests)."""
    out = {}
    for path in sorted((settings.state.prometheus / "targets").glob("*/*.json")):
        out[f"{path.parent.name}/{path.name}"] = _read_groups(path)
    return out
