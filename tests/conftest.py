"""Shared test set-up: the folder decides the marker; every library writes into temporary folders."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

# Before anything imports Prefect, MLflow, Ray or torch: keep their state out of $HOME.
_SANDBOX = Path(tempfile.mkdtemp(prefix="nw-tests-"))
# Ray reads its auth token once per process, possibly while a test module is collected (importing
# ray.serve): from the start, this process's token is the one every test's Ray instance uses.
RAY_TEST_TOKEN = secrets.token_hex(32)
(_SANDBOX / "ray_token").write_text(RAY_TEST_TOKEN)
os.environ.update(
    {
        "PREFECT_HOME": str(_SANDBOX / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "MLFLOW_TRACKING_URI": f"sqlite:///{_SANDBOX / 'mlflow.db'}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "TORCH_EXTENSIONS_DIR": str(_SANDBOX / "torch_extensions"),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TMPDIR": str(_SANDBOX / "ray"),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(_SANDBOX / "ray_token"),
        # Read once per process too: every Ray of the tests is a one-machine Ray (node address
        # 127.0.0.1), as nodewise's local instance is, so this process's driver matches each of them.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "NODEWISE_STATE_DIR": str(_SANDBOX / "state"),
    }
)
for _name in list(os.environ):
    if _name.startswith("NODEWISE_") and _name != "NODEWISE_STATE_DIR":
        del os.environ[_name]

_MARKERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for marker in _MARKERS:
            if marker in parts:
                item.add_marker(getattr(pytest.mark, marker))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_SANDBOX, ignore_errors=True)


@pytest.fixture(autouse=True)
def _unit_isolation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit tests start no Ray and reach no network beyond loopback."""
    if request.node.get_closest_marker("unit") is None:
        return
    import ray

    def no_ray(*args: object, **kwargs: object) -> None:
        raise AssertionError("unit tests must not start or join Ray; move this to tests/integration")

    monkeypatch.setattr(ray, "init", no_ray)
    real_connect = socket.socket.connect

    def loopback_only(self: socket.socket, address: object) -> object:
        host = address[0] if isinstance(address, tuple) else ""
        if isinstance(address, tuple) and host not in ("127.0.0.1", "localhost", "::1"):
            raise AssertionError(f"unit tests must not reach the network ({address!r})")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
