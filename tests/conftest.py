"""Shared test set-up: the folder decides the marker; every library writes into temporary folders."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

# Before anything imports Prefect, MLflow, Ray or torch: keep their state out of $HOME.
from testkit.registrar import Registrar
from testkit.sandbox import RAY_TEST_TOKEN, SANDBOX

__all__ = ["RAY_TEST_TOKEN", "free_port"]

_MARKERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for marker in _MARKERS:
            if marker in parts:
                item.add_marker(getattr(pytest.mark, marker))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(SANDBOX, ignore_errors=True)


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
        if isinstance(address, tuple) and not (str(host).startswith("127.") or host in ("localhost", "::1")):
            raise AssertionError(f"unit tests must not reach the network ({address!r})")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def registrar() -> Iterator[Registrar]:
    """One registering process for the whole run (see testkit/registrar.py)."""
    made = Registrar()
    yield made
    made.close()
