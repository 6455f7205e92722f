"""deploy_model against real SQLite MLflow, Prefect's harness and a local Ray."""

from __future__ import annotations

import json
import time

import httpx
import mlflow
import numpy as np
import pytest
import torch

from nodewise.core.errors import DeployFailed, ModelNotFound, RegistryUnreachable, UnsupportedModel
from nodewise.core.settings import Settings
from nodewise.demo_models import digits_split
from nodewise.ops.status import deployment_status
from tasks.records import load_records
from testkit import serve_replicas, wait_until
from testkit.flows import deploy_model
from testkit.models import BrokenOnLoad, DoubleIt, register_pyfunc, register_unservable
from tests.integration.conftest import registered_with_serve_tags


def own_output(uri: str, rows: np.ndarray) -> np.ndarray:
    module = mlflow.pytorch.load_model(uri, map_location="cpu")
    with torch.no_grad():
        return module(torch.from_numpy(rows)).numpy()


def test_prediction_over_http_equals_the_models_own_output(settings: Settings, digits_model: str) -> None:
    record = deploy_model(digits_model, settings=settings)
    assert record.backend == "ray_serve"
    assert record.endpoint == f"http://127.0.0.1:{settings.serve.port}/nodewise-digits"
    _, _, x_test, _ = digits_split()
    rows = x_test[:5]
    expected = own_output(record.model_uri, rows)
    for body in (
        {"inputs": rows.tolist()},
        {"dataframe_split": {"columns": [f"p{i}" for i in range(64)], "data": rows.tolist()}},
    ):
        answer = httpx.post(f"{record.endpoint}/invocations", json=body, timeout=30)
        assert answer.status_code == 200, answer.text
        np.testing.assert_allclose(np.array(answer.json()["predictions"]), expected, rtol=1e-5, atol=1e-6)
    status = deployment_status(settings)
    assert [(d["app"], d["version"], d["health"]) for d in status["deployments"]] == [
        ("nodewise-digits", record.model_version, "healthy")
    ]


def test_bad_request_gets_400_naming_the_problem(settings: Settings, digits_model: str) -> None:
    record = load_records(settings.state.records).get("nodewise-digits") or deploy_model(
        digits_model, settings=settings
    )
    answer = httpx.post(f"{record.endpoint}/invocations", json={"inputs": [[1.0, 2.0]]}, timeout=30)
    assert answer.status_code == 400
    assert "input has shape [1, 2]; this model expects [-1, 64]" in answer.json()["message"]
    assert httpx.get(f"{record.endpoint}/nope", timeout=10).status_code == 404
    assert httpx.get(f"{record.endpoint}/ping", timeout=10).status_code == 200


def test_generic_pyfunc_model_is_served(settings: Settings) -> None:
    uri = register_pyfunc(DoubleIt(), "double-it", str(settings.state.artifacts))
    record = deploy_model(uri, settings=settings)
    answer = httpx.post(f"{record.endpoint}/invocations", json={"inputs": [[1.0, 2.0, 3.0]]}, timeout=30)
    assert answer.status_code == 200, answer.text
    assert np.asarray(answer.json()["predictions"]).ravel().tolist() == [2.0, 4.0, 6.0]


@pytest.mark.parametrize(
    ("uri", "error", "message"),
    [
        (
            "models:/no-such-model@champion",
            ModelNotFound,
            r"no registered model named 'no-such-model'; registered models: .*nodewise-digits",
        ),
        ("models:/nodewise-digits@staging", ModelNotFound, r"has no alias 'staging' \(aliases: @champion -> 1\)"),
        ("models:/nodewise-digits/99", ModelNotFound, r"has no version 99 \(versions: 1\)"),
    ],
)
def test_unknown_model_alias_or_version(
    settings: Settings, digits_model: str, uri: str, error: type, message: str
) -> None:
    before = load_records(settings.state.records)
    with pytest.raises(error, match=message):
        deploy_model(uri, settings=settings)
    assert load_records(settings.state.records) == before


def test_unservable_flavour_is_refused(settings: Settings) -> None:
    uri = register_unservable("onnx-only", str(settings.state.artifacts))
    with pytest.raises(UnsupportedModel, match=r"has flavours \['onnx_custom'\]; nodewise serves models with one of"):
        deploy_model(uri, settings=settings)
    assert "onnx-only" not in load_records(settings.state.records)


def test_unreachable_registry_fails_after_bounded_retries(settings: Settings) -> None:
    from .conftest import free_port_block

    port = free_port_block(1)
    bad = settings.model_copy(
        update={"mlflow": settings.mlflow.model_copy(update={"tracking_uri": f"http://127.0.0.1:{port}"})}
    )
    with pytest.raises(RegistryUnreachable, match=rf"could not reach the MLflow registry at http://127.0.0.1:{port}"):
        deploy_model("models:/x/1", settings=bad)


def test_a_model_that_fails_to_load_is_rolled_back(settings: Settings) -> None:
    from ray import serve

    uri = register_pyfunc(BrokenOnLoad(), "broken", str(settings.state.artifacts))
    with pytest.raises(
        DeployFailed, match=r"did not become RUNNING .*this model cannot load.*rolled back: deleted broken"
    ):
        deploy_model(uri, settings=settings)
    assert "broken" not in serve.status().applications
    assert "broken" not in load_records(settings.state.records)


def test_replicas_follow_a_load_step_up_and_back_down_with_no_request_lost(settings: Settings) -> None:
    """Autoscaling bounds and pace from the model's own nodewise.serve.* tags; a closed-loop load
    step adds a replica, the end of the load removes it, and no request fails on the way. The
    watchdog, passing while the new replica starts, restarts nothing and reports nothing: a
    scale-up is not a sick replica."""

    from nodewise.ops.status import deployment_status
    from tasks.watchdog.engine import watch_once
    from testkit import LoadClient

    name, version = registered_with_serve_tags(
        settings, "digits-autoscaled", min_replicas=1, max_replicas=2, target_ongoing_requests=1,
        upscale_delay_s=0, downscale_delay_s=3,
    )  # fmt: skip
    record = deploy_model(f"models:/{name}/{version}", settings=settings)

    def states() -> list[str]:
        return [r["state"] for r in serve_replicas(record.app_name)]

    def running() -> int:
        return states().count("RUNNING")

    def wait_for(replicas: int, timeout_s: float, watch: bool = False) -> float:
        started, watched = time.monotonic(), []

        def there() -> bool:
            if running() == replicas:
                return True
            if watch and not watched and len(states()) > running():  # a replica is starting: a pass now
                watched[:] = watch_once(settings)
                assert [a for a in watched if a.app == record.app_name] == [], watched
            return False

        wait_until(there, timeout_s, f"{replicas} replica(s) running", seen=states)
        return time.monotonic() - started

    assert running() == 1
    _, _, x_test, _ = digits_split()
    body = json.dumps({"inputs": x_test[:1].tolist()}).encode()
    [row] = [r for r in deployment_status(settings)["deployments"] if r["app"] == record.app_name]
    assert row["autoscaling"] == {
        "min_replicas": 1,
        "max_replicas": 2,
        "ceiling": "max_replicas 2",
        "why": "0 request(s) in flight, target 1 a replica: wants 1",  # idle: what its replica reports
    }
    with LoadClient(f"{record.endpoint}/invocations", body, workers=4) as load:
        up_s = wait_for(2, 90, watch=True)
        time.sleep(2)  # both serve
        assert [a for a in watch_once(settings) if a.app == record.app_name] == []
        # status says why: the load its replicas report, read as the autoscaling policy reads it
        [busy] = [r for r in deployment_status(settings)["deployments"] if r["app"] == record.app_name]
        assert "request(s) in flight, target 1 a replica: wants" in busy["autoscaling"]["why"], busy
    down_s = wait_for(1, 90)
    print(f"autoscaling: 1 -> 2 replicas {up_s:.1f} s after the step, back to 1 {down_s:.1f} s after it ended")
    assert load.failures == []
    assert load.ok > 50
    assert httpx.post(f"{record.endpoint}/invocations", content=body, timeout=30).status_code == 200


def test_a_model_scaled_to_zero_releases_its_replicas_and_answers_after_a_cold_start(settings: Settings) -> None:
    """Opt-in per model (nodewise.serve.min_replicas=0): the deploy proves the model loads with
    one replica, idling releases it, status says so without waking it, the watchdog restarts
    nothing, and a request then waits for a new replica. A client that will not wait that long
    (Serve's x-request-timeout-seconds) gets 503 with Retry-After, not an error page."""

    from tasks.watchdog.engine import watch_once

    name, version = registered_with_serve_tags(
        settings, "digits-idle", min_replicas=0, max_replicas=1, downscale_delay_s=1
    )
    record = deploy_model(f"models:/{name}/{version}", settings=settings)
    _, _, x_test, _ = digits_split()
    body = json.dumps({"inputs": x_test[:1].tolist()}).encode()
    assert httpx.post(f"{record.endpoint}/invocations", content=body, timeout=30).status_code == 200

    def replicas() -> int:
        return len(serve_replicas(record.app_name))

    started = time.monotonic()
    wait_until(lambda: replicas() == 0, 90, "no replica after its last request", seen=replicas)
    idle_s = time.monotonic() - started
    [row] = [r for r in deployment_status(settings)["deployments"] if r["app"] == record.app_name]
    assert row["health"].startswith("scaled to zero")
    assert row["autoscaling"] == {"min_replicas": 0, "max_replicas": 1, "ceiling": "max_replicas 1"}
    assert replicas() == 0  # status did not wake it
    assert [a for a in watch_once(settings) if a.app == record.app_name] == []

    impatient = httpx.post(
        f"{record.endpoint}/invocations", content=body, headers={"x-request-timeout-seconds": "0.3"}, timeout=30
    )
    assert impatient.status_code == 503, impatient.text
    assert impatient.headers["retry-after"] == "5"
    assert impatient.json()["error_code"] == "NOT_READY"
    assert "scaled to zero" in impatient.json()["message"]
    started = time.monotonic()
    answer = httpx.post(f"{record.endpoint}/invocations", content=body, timeout=90)
    cold_s = time.monotonic() - started
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["predictions"]) == 1
    print(f"scale to zero: no replica {idle_s:.1f} s after the last request; a request then answered in {cold_s:.1f} s")
