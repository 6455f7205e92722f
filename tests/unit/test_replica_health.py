"""A replica's own health (what makes Ray Serve restart it) and the vitals it gives the watchdog."""

import asyncio

import pytest

from serving.app import ModelServer, Outcomes, resident_bytes
from serving.spec import ModelServeSpec


def replica(**spec: object) -> ModelServer:
    server = ModelServer.__new__(ModelServer)  # without loading a model from MLflow
    server.spec = ModelServeSpec(
        app_name="m",
        route_prefix="/m",
        model_uri="models:/m/1",
        model_name="m",
        model_version="1",
        tracking_uri="sqlite:///x.db",
        registry_uri="sqlite:///x.db",
        flavor="pytorch",
        **spec,
    )
    server.model = object()  # type: ignore[assignment]
    server.outcomes = Outcomes()
    return server


def test_a_loaded_replica_passes_whatever_its_memory_and_errors() -> None:
    server = replica(memory_limit_bytes=2**20)  # far below its RSS: the watchdog's call, not Serve's
    for _ in range(10):
        server.outcomes.add(ok=False)
    server.check_health()


def test_not_loaded_fails() -> None:
    server = replica()
    server.model = None
    with pytest.raises(RuntimeError, match="model is not loaded"):
        server.check_health()


def test_outcomes_count_over_a_window_and_forget_old_seconds() -> None:
    outcomes = Outcomes(keep_s=100)
    for second in range(300):
        outcomes.add(ok=second % 3 != 0, now=1000.0 + second)
    assert outcomes.window(60, now=1299.5) == (60, 20)
    assert outcomes.window(1000, now=1299.5) == (100, 33)  # only the last keep_s seconds are kept
    assert len(outcomes._buckets) <= 101


def test_vitals_without_a_canary_report_memory_and_errors() -> None:
    server = replica(memory_limit_bytes=2**30)
    server.outcomes.add(ok=True)
    server.outcomes.add(ok=False)
    vitals = asyncio.run(server.vitals(None, 60.0))
    assert vitals["rss_bytes"] > 2**20
    assert abs(vitals["rss_bytes"] - resident_bytes()) < 64 * 2**20
    assert (vitals["requests"], vitals["errors"], vitals["memory_limit_bytes"]) == (2, 1, 2**30)
    assert vitals["canary_error"] is None


def test_a_failing_canary_is_reported_not_raised() -> None:
    server = replica()

    class Broken:
        batches = False

        def parse(self, body: bytes, content_type: str) -> object:
            return body

        def predict(self, data: object) -> object:
            raise RuntimeError("weights are gone")

    server.model = Broken()  # type: ignore[assignment]
    vitals = asyncio.run(server.vitals(b'{"inputs": [[1]]}', 60.0))
    assert vitals["canary_error"] == "RuntimeError: weights are gone"
    assert vitals["requests"] == 0  # the canary is not traffic
