"""Version upgrades under a steady client: rolling, no request lost, failed upgrades roll back."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from nodewise.core.errors import DeployFailed
from nodewise.core.settings import Settings
from nodewise.demo_models import digits_split, register_demo_model
from tasks.records import DeploymentRecord, get_record
from testkit import LoadClient, wait_until
from testkit.flows import deploy_model

from .conftest import module_settings


@pytest.fixture(scope="module")
def settings(prefect_harness: None) -> Iterator[Settings]:
    yield from module_settings(serve={"replicas": 2})


def body() -> bytes:
    _, _, x_test, _ = digits_split()
    return json.dumps({"inputs": x_test[:1].tolist()}).encode()


def served_version(endpoint: str) -> str:
    return httpx.get(f"{endpoint}/version", timeout=10).json()["version"]


@pytest.fixture(scope="module")
def deployed(settings: Settings) -> DeploymentRecord:
    """The demo model, version 1, served by two replicas: what each test upgrades."""
    v1 = register_demo_model(str(settings.state.artifacts))
    return deploy_model(f"models:/{v1.name}/{v1.version}", settings=settings)


def test_upgrade_under_a_steady_client_loses_no_request(settings: Settings, deployed: DeploymentRecord) -> None:
    before = get_record(settings.state.records, deployed.app_name)
    v2 = register_demo_model(str(settings.state.artifacts), retrain=True)
    with LoadClient(f"{before.endpoint}/invocations", body()) as client:
        wait_until(lambda: client.ok >= 10, 60, "the client served before the upgrade", every_s=0.2)
        second = deploy_model(f"models:/{v2.name}/{v2.version}", settings=settings)
        wait_until(lambda: served_version(second.endpoint) == v2.version, 60, f"version {v2.version} served")
        served = client.ok
        wait_until(lambda: client.ok >= served + 10, 60, "the client served after the upgrade", every_s=0.2)
    assert client.failures == []
    assert client.ok > 50
    assert served_version(second.endpoint) == v2.version
    record = get_record(settings.state.records, second.app_name)
    assert (record.model_version, record.previous_version) == (v2.version, before.model_version)


def test_a_failed_upgrade_rolls_back_and_the_old_version_keeps_serving(
    settings: Settings, deployed: DeploymentRecord
) -> None:
    from testkit.models import BrokenOnLoad, register_pyfunc

    current = get_record(settings.state.records, deployed.app_name)
    assert current is not None
    # A broken version of the same registered model.
    broken = register_pyfunc(BrokenOnLoad(), current.model_name, str(settings.state.artifacts))
    with LoadClient(f"{current.endpoint}/invocations", body()) as client:
        with pytest.raises(DeployFailed, match=r"this model cannot load.*rolled back"):
            deploy_model(broken, settings=settings)
        served = client.ok
        wait_until(lambda: client.ok >= served + 10, 60, "the client served after the rollback", every_s=0.2)
    assert client.failures == []
    assert served_version(current.endpoint) == current.model_version
    assert get_record(settings.state.records, deployed.app_name).model_version == current.model_version
