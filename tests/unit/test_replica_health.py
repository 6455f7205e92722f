"""A replica's check_health: what makes Ray Serve restart it alone."""

import pytest

from serving.app import ModelServer, resident_bytes
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
    server._consecutive_errors = 0
    return server


def test_healthy_replica_passes() -> None:
    replica(memory_limit_bytes=resident_bytes() + 2**30).check_health()


def test_not_loaded_fails() -> None:
    server = replica()
    server.model = None
    with pytest.raises(RuntimeError, match="model is not loaded"):
        server.check_health()


def test_consecutive_inference_errors_fail() -> None:
    server = replica(max_consecutive_errors=3)
    server._consecutive_errors = 3
    with pytest.raises(RuntimeError, match="3 consecutive inference errors"):
        server.check_health()


def test_memory_past_the_limit_fails() -> None:
    assert resident_bytes() > 2**20
    with pytest.raises(RuntimeError, match=r"replica memory \d+ MiB is past its limit 1 MiB"):
        replica(memory_limit_bytes=2**20).check_health()
