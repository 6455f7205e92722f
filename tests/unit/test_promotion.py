"""Webhook checks and event ids (plain functions; the servers are in tests/integration/test_promotion.py)."""

import json
from pathlib import Path

import pytest

from nodewise.core.errors import WebhookRejected
from tasks.triggers.promotion import SeenDeliveries, parse_promotion, promotion_event, sign, verify

SECRET = "s3cret"
BODY = json.dumps(
    {"entity": "model_version_alias", "action": "created", "data": {"name": "m", "alias": "champion", "version": "3"}}
).encode()


def headers(body: bytes = BODY, stamp: float = 1000.0, secret: str = SECRET, delivery: str = "d-1") -> dict[str, str]:
    text = str(int(stamp))
    return {
        "X-MLflow-Delivery-Id": delivery,
        "X-MLflow-Timestamp": text,
        "X-MLflow-Signature": sign(secret, delivery, text, body),
    }


def test_mlflows_signature_scheme() -> None:
    # v1,<base64 HMAC-SHA256(secret, f"{delivery_id}.{timestamp}.{body}")>, as ../shared/FACTS.md records it
    import base64
    import hashlib
    import hmac

    expected = base64.b64encode(hmac.new(b"k", b"id.12.{}", hashlib.sha256).digest()).decode()
    assert sign("k", "id", "12", b"{}") == f"v1,{expected}"


def test_a_good_delivery_passes_and_bad_ones_say_why() -> None:
    assert verify(headers(), BODY, SECRET, 300, now=1010) == "d-1"
    with pytest.raises(WebhookRejected, match="signature does not match") as forged:
        verify(headers(secret="other"), BODY, SECRET, 300, now=1010)
    assert forged.value.status == 401
    with pytest.raises(WebhookRejected, match="signature does not match"):
        verify(headers(), BODY + b" ", SECRET, 300, now=1010)  # a body changed on the way
    with pytest.raises(WebhookRejected, match="delivery is 400 s old, past the 300 s allowed"):
        verify(headers(), BODY, SECRET, 300, now=1400)
    with pytest.raises(WebhookRejected, match="missing X-MLflow-Delivery-Id"):
        verify({}, BODY, SECRET, 300, now=1000)


def test_payloads() -> None:
    events = ("model_version_alias.created",)
    assert parse_promotion(BODY, events) == ("m", "champion", "3")
    assert parse_promotion(b'{"entity": "registered_model", "action": "created", "data": {}}', events) is None
    for bad in (b"{oops", b"[]", b'{"entity": "model_version_alias"}'):
        with pytest.raises(WebhookRejected, match="not an MLflow webhook payload") as e:
            parse_promotion(bad, events)
        assert e.value.status == 400


def test_replays_are_remembered_for_a_while(tmp_path: Path) -> None:
    seen = SeenDeliveries(tmp_path / "seen.json", keep_s=600)
    assert seen.first_time("a", now=0)
    assert not seen.first_time("a", now=10)
    assert SeenDeliveries(tmp_path / "seen.json", keep_s=600).first_time("a", now=700)  # forgotten after keep_s
    seen.forget("a")
    assert seen.first_time("a", now=701)


def test_event_ids_are_the_same_for_the_same_announcement() -> None:
    one = promotion_event("m", "champion", "3", "poller", 2)
    assert one["id"] == promotion_event("m", "champion", "3", "poller", 2)["id"]
    assert one["id"] != promotion_event("m", "champion", "3", "poller", 3)["id"]  # a later change back to 3
    assert one["resource"] == {
        "prefect.resource.id": "mlflow.model.m",
        "prefect.resource.name": "m",
        "nodewise.model": "m",
        "nodewise.alias": "champion",
    }


def test_prefect_yaml_triggers_deploy_model_on_the_watched_alias() -> None:
    import yaml
    from prefect.cli.deploy._models import PrefectYamlModel

    data = yaml.safe_load((Path(__file__).resolve().parents[2] / "prefect.yaml").read_text())
    model = PrefectYamlModel.model_validate(data)
    deploy = next(d for d in model.deployments if d.name == "deploy-model")
    assert deploy.entrypoint == "flows/promote.py:deploy_registered_model"
    [trigger] = next(d for d in data["deployments"] if d["name"] == "deploy-model")["triggers"]
    assert trigger["expect"] == ["nodewise.model.promoted"]
    assert trigger["match"] == {"prefect.resource.id": "mlflow.model.*", "nodewise.alias": "champion"}
    assert trigger["parameters"]["model_name"] == "{{ event.payload.model }}"


def test_prefect_yaml_profiles_a_version_when_it_is_created() -> None:
    import inspect

    import yaml

    from flows.profile_version import profile_new_version

    data = yaml.safe_load((Path(__file__).resolve().parents[2] / "prefect.yaml").read_text())
    deploy = next(d for d in data["deployments"] if d["name"] == "profile-new-version")
    assert deploy["entrypoint"] == "flows/profile_version.py:profile_new_version"
    [trigger] = deploy["triggers"]
    assert trigger["expect"] == ["nodewise.model.version_created"]
    assert trigger["parameters"]["version"] == "{{ event.payload.version }}"
    assert set(trigger["parameters"]) == set(inspect.signature(profile_new_version.fn).parameters)


def test_a_created_version_is_one_event_whoever_announces_it() -> None:
    import json

    from tasks.triggers.promotion import CREATED, created_event, parse_created

    by_webhook, by_poller = created_event("m", "3", "webhook"), created_event("m", "3", "poller")
    assert by_webhook["id"] == by_poller["id"] != created_event("m", "4", "poller")["id"]
    assert by_webhook["event"] == CREATED
    body = {"entity": "model_version", "action": "created", "data": {"name": "m", "version": "3"}}
    assert parse_created(json.dumps(body).encode()) == ("m", "3")
    alias = {"entity": "model_version_alias", "action": "created", "data": {"name": "m", "alias": "a", "version": "3"}}
    assert parse_created(json.dumps(alias).encode()) is None
    assert parse_created(b"{not json") is None
