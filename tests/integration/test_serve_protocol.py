"""The Ray Serve endpoint speaks `mlflow models serve`'s protocol: every format, every bad input."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from nodewise.core.settings import Settings
from nodewise.demo_models import digits_split
from tasks.records import DeploymentRecord
from testkit import serve_replicas
from testkit.flows import deploy_model
from testkit.models import AddColumns, register_pyfunc

from .conftest import module_settings

LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def settings(prefect_harness: None) -> Iterator[Settings]:
    yield from module_settings(serve={"max_request_bytes": LIMIT})


@pytest.fixture(scope="module")
def digits(settings: Settings, digits_model: str) -> DeploymentRecord:
    return deploy_model(digits_model, settings=settings)


@pytest.fixture(scope="module")
def columns(settings: Settings) -> DeploymentRecord:
    example = pd.DataFrame({"a": [1.0, 2.0], "b": [10.0, 20.0]})
    return deploy_model(
        register_pyfunc(AddColumns(), "add-columns", str(settings.state.artifacts), example), settings=settings
    )


def post(url: str, body: bytes | dict, content_type: str = "application/json") -> httpx.Response:
    raw = json.dumps(body).encode() if isinstance(body, dict) else body
    return httpx.post(f"{url}/invocations", content=raw, headers={"Content-Type": content_type}, timeout=30)


def test_every_scoring_format_equals_the_models_own_output(digits: DeploymentRecord) -> None:
    from mlflow.models.utils import convert_input_example_to_serving_input

    _, _, x_test, _ = digits_split()
    rows = x_test[:4].astype("float32")
    module = mlflow.pytorch.load_model(digits.model_uri, map_location="cpu")
    with torch.no_grad():
        expected = module(torch.from_numpy(rows)).numpy()
    columns = [f"p{i}" for i in range(64)]
    frame = pd.DataFrame(rows, columns=columns)
    bodies = {
        "inputs": ({"inputs": rows.tolist()}, "application/json"),
        "instances": ({"instances": rows.tolist()}, "application/json"),
        "dataframe_split": ({"dataframe_split": {"columns": columns, "data": rows.tolist()}}, "application/json"),
        "dataframe_records": ({"dataframe_records": frame.to_dict(orient="records")}, "application/json"),
        "csv": (frame.to_csv(index=False).encode(), "text/csv"),
        # What MLflow's own helper builds for a client of `mlflow models serve`.
        "mlflow-helper": (convert_input_example_to_serving_input(rows).encode(), "application/json"),
        "charset": ({"inputs": rows.tolist()}, "application/json; charset=utf-8"),
    }
    for name, (body, content_type) in bodies.items():
        answer = post(digits.endpoint, body, content_type)
        assert answer.status_code == 200, (name, answer.text)
        assert set(answer.json()) == {"predictions"}, name
        np.testing.assert_allclose(np.array(answer.json()["predictions"]), expected, rtol=1e-5, atol=1e-5, err_msg=name)
    version = httpx.get(f"{digits.endpoint}/version", timeout=10).json()
    assert version == {"model": "nodewise-digits", "version": digits.model_version}
    assert httpx.get(f"{digits.endpoint}/health", timeout=10).status_code == 200


def test_column_schema_pyfunc_round_trips_and_names_wrong_fields(columns: DeploymentRecord) -> None:
    ok = post(columns.endpoint, {"dataframe_records": [{"a": 1.0, "b": 2.0}, {"a": 3.0, "b": 4.0}]})
    assert ok.status_code == 200, ok.text
    assert ok.json() == {"predictions": [3.0, 7.0]}
    csv = post(columns.endpoint, b"a,b\n1.5,2.5\n", "text/csv")
    assert (csv.status_code, csv.json()) == (200, {"predictions": [4.0]})
    missing = post(columns.endpoint, {"dataframe_records": [{"a": 1.0, "c": 2.0}]})
    assert missing.status_code == 400
    assert "b" in missing.json()["message"]
    assert "missing" in missing.json()["message"].lower()
    wrong_type = post(columns.endpoint, {"dataframe_split": {"columns": ["a", "b"], "data": [["x", 1.0]]}})
    assert wrong_type.status_code == 400
    assert "a" in wrong_type.json()["message"]


def test_bad_requests_get_their_status_and_never_take_a_replica_down(
    digits: DeploymentRecord, columns: DeploymentRecord, settings: Settings
) -> None:
    def replica_ids() -> list[str]:
        return sorted(r["actor_id"] for r in serve_replicas("nodewise-digits"))

    before = replica_ids()
    too_big = post(digits.endpoint, b'{"inputs": [' + b"0.0," * LIMIT + b"0.0]}")
    assert too_big.status_code == 413
    assert f"the limit is {LIMIT} (max_request_bytes)" in too_big.json()["message"]
    xml = post(digits.endpoint, b"<rows/>", "application/xml")
    assert (xml.status_code, xml.json()["error_code"]) == (415, "UNSUPPORTED_MEDIA_TYPE")
    not_json = post(digits.endpoint, b"{oops")
    assert (not_json.status_code, not_json.json()["error_code"]) == (400, "BAD_REQUEST")
    assert "body is not valid JSON" in not_json.json()["message"]
    shape = post(digits.endpoint, {"inputs": [[1.0, 2.0]]})
    assert shape.status_code == 400
    assert "this model expects [-1, 64]" in shape.json()["message"]
    text = post(digits.endpoint, {"inputs": [["a"] * 64]})
    assert text.status_code == 400
    assert "cannot be converted to float32" in text.json()["message"]
    unknown = httpx.get(f"{digits.endpoint}/nope", timeout=10)
    assert (unknown.status_code, unknown.json()["error_code"]) == (404, "ENDPOINT_NOT_FOUND")
    assert httpx.post(f"{digits.endpoint}/ping", timeout=10).status_code == 404  # wrong method
    # Bad requests are the client's: none counts as a replica error (the watchdog's error rate).
    for _ in range(12):
        assert post(digits.endpoint, {"inputs": [[1.0]]}).status_code == 400
    assert post(digits.endpoint, {"inputs": [[0.0] * 64]}).status_code == 200
    from tasks.rayserve.watch import observe

    [replica] = observe(digits, settings.watchdog).replicas
    assert replica.vitals["errors"] == 0
    assert replica.vitals["requests"] >= 1
    assert replica.vitals["canary_error"] is None
    assert replica_ids() == before


def test_a_model_bug_is_a_500_with_a_request_id_and_the_replica_keeps_serving(columns: DeploymentRecord) -> None:
    answer = post(columns.endpoint, {"dataframe_records": [{"a": -5000.0, "b": 1.0}]})
    assert answer.status_code == 500
    assert answer.json()["error_code"] == "INTERNAL_ERROR"
    assert "see the replica log for request id" in answer.json()["message"]
    assert "below -1000" not in answer.text  # no internals leak to the client
    assert post(columns.endpoint, {"dataframe_records": [{"a": 1.0, "b": 1.0}]}).json() == {"predictions": [2.0]}


def test_fuzzing_the_live_endpoint_from_its_openapi_document_gives_no_500(
    digits: DeploymentRecord, settings: Settings
) -> None:
    from testkit.fuzzing import fuzz_endpoint

    document = httpx.get(f"{digits.endpoint}/openapi.json", timeout=10).json()
    assert set(document["paths"]) == {"/invocations", "/ping", "/health", "/version"}
    report = fuzz_endpoint(f"{digits.endpoint}/openapi.json", max_examples=25, raw_paths=("/invocations",))
    print(report)
    assert report["server_errors"] == []
    assert report["cases"] > 50
    assert httpx.get(f"{digits.endpoint}/ping", timeout=10).status_code == 200  # the replica is alive
    assert post(digits.endpoint, {"inputs": [[0.0] * 64]}).status_code == 200
