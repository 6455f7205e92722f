"""Registry promotions as Prefect events: MLflow webhooks verified, or alias changes polled.

Both paths emit the same event, ``nodewise.model.promoted`` on the resource
``mlflow.model.<name>`` (labels ``nodewise.model`` and ``nodewise.alias``; payload alias,
version, source), posted to the Prefect API (``POST /api/events``). A ``deploy-model``
deployment trigger in prefect.yaml turns it into a deploy run.

Exactly once: every event has an id derived from what it announces (model, alias, version, and
the how-manieth change of that alias it is), and Prefect stores and triggers on an event id once.
So a webhook delivered twice, or a poller that posted and was killed before writing down that
it had, announces nothing twice.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nodewise.core.errors import ModelNotFound, PrefectUnavailable, WebhookRejected
from nodewise.core.state import locked_json, read_json
from serving.errors import decode_json

EVENT = "nodewise.model.promoted"
CREATED = "nodewise.model.version_created"  # a new version: profile it now, not when it is promoted
_IDS = uuid.UUID("5d1c3b1e-8f7a-4f0e-9a59-6e6f64657769")  # namespace of nodewise's event ids


# -- events ----------------------------------------------------------------------------------------
def promotion_event(name: str, alias: str, version: str, source: str, change: int | str) -> dict[str, Any]:
    """The Prefect event for "alias now points at version"; ``change`` tells one announcement from
    another (the how-manieth change of that alias, or the webhook's delivery id)."""
    payload = {"model": name, "alias": alias, "version": str(version), "source": source}
    return _model_event(EVENT, f"{name}\n{alias}\n{version}\n{change}", payload, {"nodewise.alias": alias})


def created_event(name: str, version: str, source: str) -> dict[str, Any]:
    """The Prefect event for "version was created" (one id per version: announced once, whoever
    announces it)."""
    payload = {"model": name, "version": str(version), "source": source}
    return _model_event(CREATED, f"{name}\n{version}\ncreated", payload, {})


def _model_event(event: str, key: str, payload: dict[str, str], labels: dict[str, str]) -> dict[str, Any]:
    """An event on the resource ``mlflow.model.<name>``, its id derived from ``key`` (what it announces)."""
    name = payload["model"]
    return {
        "id": str(uuid.uuid5(_IDS, key)),
        "occurred": datetime.now(UTC).isoformat(),
        "event": event,
        "resource": {
            "prefect.resource.id": f"mlflow.model.{name}",
            "prefect.resource.name": name,
            "nodewise.model": name,
            **labels,
        },
        "payload": payload,
    }


def post_events(api_url: str, events: list[dict[str, Any]], timeout_s: float = 10.0) -> None:
    """Send events to the Prefect API; PrefectUnavailable if it does not take them."""
    import httpx

    if not events:
        return
    try:
        response = httpx.post(f"{api_url.rstrip('/')}/events", json=events, timeout=timeout_s)
    except httpx.HTTPError as e:
        raise PrefectUnavailable(f"the Prefect API at {api_url} did not take the events ({type(e).__name__})") from e
    if response.status_code >= 300:
        raise PrefectUnavailable(f"the Prefect API at {api_url} answered {response.status_code}: {response.text[:200]}")


def require_api(api_url: str | None) -> str:
    if not api_url:
        raise PrefectUnavailable(
            "promotion events need a Prefect server: set NODEWISE_PREFECT__API_URL (e.g. "
            "http://127.0.0.1:4200/api; `nodewise up` starts one)"
        )
    return api_url


# -- webhooks --------------------------------------------------------------------------------------
def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """MLflow's ``X-MLflow-Signature``: ``v1,`` + base64 HMAC-SHA256 of ``id.timestamp.body``."""
    mac = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def verify(headers: dict[str, str], body: bytes, secret: str, max_age_s: float, now: float | None = None) -> str:
    """Check a delivery's signature and age; return its delivery id. Raises WebhookRejected (401)."""
    lower = {k.lower(): v for k, v in headers.items()}
    delivery, stamp, signature = (
        lower.get("x-mlflow-delivery-id"),
        lower.get("x-mlflow-timestamp"),
        lower.get("x-mlflow-signature"),
    )
    if not (delivery and stamp and signature):
        raise WebhookRejected(401, "missing X-MLflow-Delivery-Id, X-MLflow-Timestamp or X-MLflow-Signature")
    if not hmac.compare_digest(sign(secret, delivery, stamp, body), signature):
        raise WebhookRejected(
            401, "signature does not match (is the webhook's secret NODEWISE_TRIGGERS__WEBHOOK_SECRET?)"
        )
    try:
        age = (time.time() if now is None else now) - float(stamp)
    except ValueError as e:
        raise WebhookRejected(401, f"timestamp {stamp!r} is not a number") from e
    if abs(age) > max_age_s:
        raise WebhookRejected(401, f"delivery is {age:.0f} s old, past the {max_age_s:.0f} s allowed (a replay?)")
    return delivery


def parse_created(body: bytes) -> tuple[str, str] | None:
    """(model, version) of a ``model_version.created`` payload; None for any other delivery (what
    ``parse_promotion`` refuses, it refuses)."""
    try:
        payload = decode_json(body)
        if f"{payload['entity']}.{payload['action']}" != "model_version.created":
            return None
        return str(payload["data"]["name"]), str(payload["data"]["version"])
    except (ValueError, KeyError, TypeError):
        return None


def parse_promotion(body: bytes, events: tuple[str, ...]) -> tuple[str, str, str] | None:
    """(model, alias, version) of an alias-set payload; None for an event this receiver ignores.
    Raises WebhookRejected (400) on a body that is not a webhook payload."""
    try:
        payload = decode_json(body)  # strict: depth, duplicate keys, UTF-8 (serving/errors.py)
        kind = f"{payload['entity']}.{payload['action']}"
        data = payload["data"]
    except (ValueError, KeyError, TypeError) as e:
        raise WebhookRejected(400, f"not an MLflow webhook payload ({type(e).__name__}: {e})") from e
    if kind not in events:
        return None
    try:
        if kind == "model_version.created":
            return str(data["name"]), "", str(data["version"])
        return str(data["name"]), str(data["alias"]), str(data["version"])
    except (KeyError, TypeError) as e:
        raise WebhookRejected(400, f"{kind} payload without {e}") from e


class SeenDeliveries:
    """Delivery ids already taken (a replay is ignored), kept in a file for ``keep_s`` seconds."""

    def __init__(self, path: Path, keep_s: float) -> None:
        self.path, self.keep_s = path, keep_s

    def first_time(self, delivery_id: str, now: float | None = None) -> bool:
        """Record ``delivery_id``; whether it was new."""
        now = time.time() if now is None else now
        with locked_json(self.path) as seen:
            for old in [k for k, t in seen.items() if now - t > self.keep_s]:
                del seen[old]
            if delivery_id in seen:
                return False
            seen[delivery_id] = now
            return True

    def forget(self, delivery_id: str) -> None:
        with locked_json(self.path) as seen:
            seen.pop(delivery_id, None)


# -- polling ---------------------------------------------------------------------------------------
class Poller:
    """Alias changes in a registry that sends no webhooks (SQLite, file store), as events.

    State (``<state>/poller.json``): each model's aliases as last announced, and how many changes
    of each alias were announced. A change is posted first and written down after; posting it
    again after a crash gives the same event id, which Prefect takes once.
    """

    def __init__(self, client: Any, state: Path, alias: str | tuple[str, ...] | None = None) -> None:
        self.client, self.state = client, state
        self.aliases = (alias,) if isinstance(alias, str) else alias  # None: every alias

    def changes(self) -> list[dict[str, Any]]:
        """Events for every alias that points somewhere new since the last ``commit``."""
        known = read_json(self.state)
        events = []
        for model in self.client.search_registered_models():
            aliases = dict(getattr(model, "aliases", {}) or {})
            for alias, version in sorted(aliases.items()):
                if self.aliases and alias not in self.aliases:
                    continue
                before = known.get(model.name, {}).get(alias, {})
                if str(before.get("version")) == str(version):
                    continue
                change = int(before.get("changes", 0)) + 1
                events.append(promotion_event(model.name, alias, str(version), "poller", change))
        return events

    def new_versions(self) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """Events for the versions created since the last ``commit``, and each model's newest version.
        A model seen for the first time announces nothing: its versions predate the poller."""
        known = read_json(self.state)
        events, newest = [], {}
        for model in self.client.search_registered_models():
            found = self.client.search_model_versions(f"name = '{model.name}'", max_results=200)
            numbers = sorted(int(v.version) for v in found)
            if not numbers:
                continue
            newest[model.name] = numbers[-1]
            seen = known.get(model.name, {}).get(_SEEN)
            if seen is None:
                continue
            events += [created_event(model.name, str(n), "poller") for n in numbers if n > int(seen)]
        return events, newest

    def commit(self, events: list[dict[str, Any]], newest: dict[str, int] | None = None) -> None:
        with locked_json(self.state) as known:
            for event in events:
                p = event["payload"]
                if event["event"] != EVENT:
                    continue
                entry = known.setdefault(p["model"], {}).setdefault(p["alias"], {"changes": 0})
                entry.update(version=p["version"], changes=int(entry.get("changes", 0)) + 1)
            for name, number in (newest or {}).items():
                known.setdefault(name, {})[_SEEN] = number

    def poll_once(self, api_url: str) -> list[dict[str, Any]]:
        """Post the alias changes and the new versions; return them."""
        created, newest = self.new_versions()
        events = self.changes() + created
        post_events(api_url, events)
        self.commit(events, newest)
        return events


_SEEN = "@newest_version"  # in a model's entry of the poller's state ("@" is in no alias name)


# -- what a promotion's deploy run needs (flows/promote.py composes these) -------------------------
PREVIOUS_ALIAS = "previous"
KEEP_HISTORY = 50


def alias_target(client: Any, name: str, alias: str) -> str:
    """The version ``alias`` points at now."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as e:
        raise ModelNotFound(f"model {name!r} has no alias {alias!r}: set it, or give a version") from e


def serving_version(records_path: Path, model_name: str) -> str | None:
    """The version of ``model_name`` nodewise serves here, if any."""
    from tasks.records import app_name_for, get_record

    record = get_record(records_path, app_name_for(model_name))
    return record.model_version if record else None


def record_outcome(path: Path, model: str, version: str, outcome: str, duration_s: float | None = None) -> None:
    """The promotions' history (``<state>/promotions.json``, the last 50); ``duration_s``: how long the
    deploy took (the metrics' last promotion duration)."""
    with locked_json(path) as data:
        history = data.setdefault("history", [])
        at = datetime.now(UTC).isoformat(timespec="seconds")
        entry: dict[str, object] = {"at": at, "model": model, "version": version, "outcome": outcome}
        if duration_s is not None:
            entry["duration_s"] = round(duration_s, 3)
        history.append(entry)
        del history[:-KEEP_HISTORY]
