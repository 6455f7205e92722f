"""Version upgrades under a steady client: rolling, no request lost, failed upgrades roll back."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from nodewise.cli.demo import digits_split, register_demo_model
from nodewise.core.errors import DeployFailed
from nodewise.core.settings import Settings
from tasks.records import get_record
from tests.flows import deploy_model
from tests.support import LoadClient

from .conftest import module_settings


@pytest.fixture(scope="module")
def settings(prefect_harness: None) -> Iterator[Settings]:
    yield from module_settings(serve={"replicas": 2})


def body() -> bytes:
    _, _, x_test, _ = digits_split()
    return json.dumps({"inputs": x_test[:1].tolist()}).encode()


def served_version(endpoint: str) -> str:
    return httpx.get(f"{endpoint}/version", timeout=10).json()["version"]


def test_upgrade_under_a_steady_client_loses_no_request(settings: Settings) -> None:
    root = str(settings.state.artifacts)
    v1 = register_demo_model(root)
    first = deploy_model(f"models:/{v1.name}/{v1.version}", settings=settings)
    v2 = register_demo_model(root, retrain=True)
    with LoadClient(f"{first.endpoint}/invocations", body()) as client:
        time.sleep(2)
        second = deploy_model(f"models:/{v2.name}/{v2.version}", settings=settings)
        deadline = time.monotonic() + 60
        while served_version(second.endpoint) != v2.version and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(2)
    assert client.failures == []
    assert client.ok > 50
    assert served_version(second.endpoint) == v2.version
    record = get_record(settings.state.records, second.app_name)
    assert (record.model_version, record.previous_version) == (v2.version, v1.version)


def test_a_failed_upgrade_rolls_back_and_the_old_version_keeps_serving(settings: Settings) -> None:
    from .models import BrokenOnLoad, register_pyfunc

    current = get_record(settings.state.records, "nodewise-digits")
    assert current is not None
    # A broken version of the same registered model.
    broken = register_pyfunc(BrokenOnLoad(), "nodewise-digits", str(settings.state.artifacts))
    with LoadClient(f"{current.endpoint}/invocations", body()) as client:
        with pytest.raises(DeployFailed, match=r"this model cannot load.*rolled back"):
            deploy_model(broken, settings=settings)
        time.sleep(2)
    assert client.failures == []
    assert served_version(current.endpoint) == current.model_version
    assert get_record(settings.state.records, "nodewise-digits").model_version == current.model_version
