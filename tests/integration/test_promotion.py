"""Registry promotions as Prefect events, on real servers: `mlflow server` (SQLite, webhooks on)
delivering signed webhooks to nodewise's receiver, the poller on a SQLite registry, and both
posting to the Prefect test harness's API, where the events are read back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from nodewise.core.settings import Settings
from tasks.triggers.promotion import CREATED, EVENT, Poller, sign
from testkit import read_events, wait_for_events
from testkit.registrar import Registrar
from tests.integration.conftest import free_port_block, module_settings

SECRET = "test-webhook-secret"


@pytest.fixture(scope="module")
def settings(prefect_harness: None) -> Iterator[Settings]:
    yield from module_settings(triggers={"webhook_secret": SECRET})


def prefect_api() -> str:
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value())


def events_of(model: str, at_least: int = 1, event: str = EVENT) -> list[dict]:
    """Promotion events (or ``event``s) of ``model`` in the Prefect API, once at least ``at_least``
    are stored (they are stored asynchronously)."""
    return wait_for_events([event], resource=f"mlflow.model.{model}", at_least=at_least, timeout_s=20)


def stored_events_of(model: str, event: str = EVENT) -> list[dict]:
    """The ``event``s of ``model`` stored now."""
    return read_events([event], resource=f"mlflow.model.{model}")


@pytest.fixture(scope="module")
def mlflow_server(settings: Settings) -> Iterator[str]:
    from cryptography.fernet import Fernet

    port = free_port_block(1)
    folder = settings.state_path / "mlflow-server"
    folder.mkdir()
    # The server must not inherit this process's MLFLOW_TRACKING_URI/REGISTRY_URI: it would look its
    # webhooks up in that other store and deliver nothing.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        # the server caches each event's webhooks (60 s by default): a test's new webhook is seen at once
        "MLFLOW_WEBHOOK_CACHE_TTL": "1",
        "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode(),
    }
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db"]
    cmd += ["--default-artifact-root", f"file://{folder}/artifacts", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--workers", "1"]
    log = (folder / "server.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, (folder / "server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "mlflow server not healthy after 120 s"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)
        log.close()


@pytest.fixture(scope="module")
def receiver(settings: Settings, mlflow_server: str) -> Iterator[str]:
    from tasks.triggers.webhook_server import Receiver, registry_lookup, serve, start_in_thread

    port = free_port_block(1)
    on_server = settings.model_copy(
        update={"mlflow": settings.mlflow.model_copy(update={"tracking_uri": mlflow_server})}
    )
    server = serve(Receiver(on_server, prefect_api(), registry_lookup(on_server)), "127.0.0.1", port)
    start_in_thread(server)
    yield f"http://127.0.0.1:{port}/webhook"
    server.shutdown()
    server.server_close()


def register_on(registrar: Registrar, tracking_uri: str, name: str, artifact_root: str) -> str:
    """A small pyfunc registered through ``tracking_uri``; returns its version. In another process,
    as a user's script: this process's MLflow globals stay pointed at the module's own store."""
    return registrar.register("double-it", tracking_uri, artifact_root, name=name)


def test_setting_the_alias_on_mlflow_server_announces_the_promotion(
    settings: Settings, mlflow_server: str, receiver: str, registrar: Registrar
) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    client.create_webhook("nodewise", receiver, events=["model_version_alias.created"], secret=SECRET)
    version = register_on(registrar, mlflow_server, "promoted", str(settings.state.artifacts))
    started = time.monotonic()
    client.set_registered_model_alias("promoted", "champion", version)
    [event] = events_of("promoted")
    assert event["payload"] == {"model": "promoted", "alias": "champion", "version": version, "source": "webhook"}
    assert event["resource"]["nodewise.alias"] == "champion"
    print(f"alias set -> event stored in Prefect: {time.monotonic() - started:.1f} s")
    client.set_registered_model_alias("promoted", "challenger", version)  # a rollout's alias: announced
    challenger = next(e for e in events_of("promoted", at_least=2) if e["payload"]["alias"] == "challenger")
    assert challenger["resource"]["nodewise.alias"] == "challenger"
    client.set_registered_model_alias("promoted", "staging", version)  # another alias: not announced
    time.sleep(2)  # time for a wrong announcement to be stored
    assert len(stored_events_of("promoted")) == 2


def deliver(url: str, body: bytes, delivery: str | None = None, stamp: float | None = None, secret: str = SECRET):
    delivery = delivery or str(uuid.uuid4())
    stamp_text = str(int(stamp if stamp is not None else time.time()))
    headers = {
        "X-MLflow-Delivery-Id": delivery,
        "X-MLflow-Timestamp": stamp_text,
        "X-MLflow-Signature": sign(secret, delivery, stamp_text, body),
        "Content-Type": "application/json",
    }
    return httpx.post(url, content=body, headers=headers, timeout=10)


def alias_body(name: str, version: str, alias: str = "champion") -> bytes:
    payload = {
        "entity": "model_version_alias",
        "action": "created",
        "data": {"name": name, "alias": alias, "version": version},
    }
    return json.dumps(payload).encode()


def test_forged_stale_replayed_malformed_and_unknown_deliveries(
    settings: Settings, mlflow_server: str, receiver: str, registrar: Registrar
) -> None:
    version = register_on(registrar, mlflow_server, "guarded", str(settings.state.artifacts))
    body = alias_body("guarded", version)
    forged = deliver(receiver, body, secret="not-the-secret")
    assert (forged.status_code, forged.json()["message"].startswith("signature does not match")) == (401, True)
    stale = deliver(receiver, body, stamp=time.time() - 3600)
    assert stale.status_code == 401
    assert "past the 300 s allowed" in stale.json()["message"]
    garbage = deliver(receiver, b"{not json")
    assert (garbage.status_code, garbage.json()["message"].startswith("not an MLflow webhook payload")) == (400, True)
    unknown = deliver(receiver, alias_body("no-such-model", "1"))
    assert unknown.json() == {"ignored": "model 'no-such-model' is not in the registry"}

    delivery = str(uuid.uuid4())
    first = deliver(receiver, body, delivery=delivery)
    assert first.status_code == 202
    replay = deliver(receiver, body, delivery=delivery)
    assert (replay.status_code, replay.json()) == (200, {"ignored": f"delivery {delivery} was already taken"})
    time.sleep(2)  # time for a wrong announcement to be stored
    assert [e["payload"]["version"] for e in events_of("guarded")] == [version]  # the replay announced nothing
    assert stored_events_of("no-such-model") == []


def test_a_new_version_is_announced_by_its_webhook_and_not_as_a_promotion(
    settings: Settings, mlflow_server: str, receiver: str, registrar: Registrar
) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    client.create_webhook("nodewise-created", receiver, events=["model_version.created"], secret=SECRET)
    version = register_on(registrar, mlflow_server, "fresh", str(settings.state.artifacts))
    [event] = events_of("fresh", event=CREATED)
    assert event["payload"] == {"model": "fresh", "version": version, "source": "webhook"}
    assert stored_events_of("fresh") == []  # created is not promoted


def test_the_poller_announces_a_new_version_once_and_the_flow_profiles_it(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, registrar: Registrar
) -> None:
    """The poller (no webhooks) announces a version created after it first saw the model, once;
    the profile-new-version flow caches the profile a deploy of it looks up."""
    from mlflow import MlflowClient

    from tasks.planning import profile_models
    from tasks.planning.profile_models import cache_key, profile_with_cache
    from tasks.planning.registry import resolve_model
    from testkit.flows import profile_new_version

    client = MlflowClient()
    api, state = prefect_api(), settings.state_path / "poller-created.json"
    register_on(registrar, settings.tracking_uri, "grown", str(settings.state.artifacts))

    def created() -> list[str]:  # an alias no test sets: alias changes stay out of it
        return [e["payload"]["version"] for e in Poller(client, state, "none-here").poll_once(api)]

    assert created() == []  # the versions it found on first sight predate it
    v2 = register_on(registrar, settings.tracking_uri, "grown", str(settings.state.artifacts))
    assert created() == [v2]
    assert created() == []
    assert [e["payload"]["version"] for e in events_of("grown", event=CREATED)] == [v2]

    profile_new_version("grown", v2, settings=settings)
    key = cache_key(None, settings.serve.max_batch_size, "cpu")
    assert key in client.get_model_version("grown", v2).tags
    model = resolve_model(f"models:/grown/{v2}", client)

    def measured_again(*args: object, **kwargs: object) -> None:
        raise AssertionError("profiled again: the flow's cached profile was not found on the version's tags")

    monkeypatch.setattr(profile_models, "profile_registered", measured_again)
    cached = profile_with_cache(model, batch_size=settings.serve.max_batch_size, device="cpu")
    assert cached.total_bytes > 0


def test_the_poller_announces_each_change_once_across_restarts(settings: Settings, registrar: Registrar) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()  # the module's SQLite registry: no webhooks there
    api, state = prefect_api(), settings.state.poller
    v1 = register_on(registrar, settings.tracking_uri, "polled", str(settings.state.artifacts))
    v2 = register_on(registrar, settings.tracking_uri, "polled", str(settings.state.artifacts))
    client.set_registered_model_alias("polled", "champion", v1)
    assert [e["payload"]["version"] for e in Poller(client, state, "champion").poll_once(api)] == [v1]
    assert Poller(client, state, "champion").poll_once(api) == []  # a restarted poller: nothing new
    client.set_registered_model_alias("polled", "champion", v2)
    # Killed after posting, before writing it down: the next poller posts the same event again ...
    crashed = Poller(client, state, "champion")
    from tasks.triggers.promotion import post_events

    post_events(api, crashed.changes())
    again = Poller(client, state, "champion").poll_once(api)
    assert [e["payload"]["version"] for e in again] == [v2]
    # ... and Prefect holds it once: the event id is the same.
    found = events_of("polled", at_least=2)
    assert sorted(e["payload"]["version"] for e in found) == sorted([v1, v2])
    assert Poller(client, state, "champion").poll_once(api) == []


def test_fuzzing_the_receiver_with_signed_bodies_gives_no_500(receiver: str) -> None:
    from testkit.fuzzing import fuzz_endpoint

    def signed(body: bytes) -> dict[str, str]:
        delivery, stamp = str(uuid.uuid4()), str(int(time.time()))
        signature = sign(SECRET, delivery, stamp, body)
        return {"X-MLflow-Delivery-Id": delivery, "X-MLflow-Timestamp": stamp, "X-MLflow-Signature": signature}

    base = receiver.removesuffix("/webhook")
    report = fuzz_endpoint(f"{base}/openapi.json", max_examples=40, sign=signed, raw_paths=("/webhook",))
    print(report)
    assert report["server_errors"] == []
    assert report["cases"] > 60
    assert httpx.get(f"{base}/health", timeout=10).status_code == 200
