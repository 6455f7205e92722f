"""Real services: SQLite MLflow, Prefect's test harness and a local Ray instance per module."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodewise.core.procs import free_port_block
from nodewise.core.runtime import configure_process
from nodewise.core.settings import Settings
from tests.conftest import RAY_TEST_TOKEN

_SESSION_RAY_TOKEN = RAY_TEST_TOKEN  # see tests/conftest.py


def make_settings(**overrides: object) -> Settings:
    # A short state path: Ray's socket paths live under it.
    state = Path(tempfile.mkdtemp(prefix="nw-", dir="/tmp"))
    base = free_port_block(6)
    values: dict = {
        "state_dir": state,
        "ray": {"port": base, "num_cpus": 2},
        "serve": {"port": base + 4, "replicas": 1, "ready_timeout_s": 120},
        # DeepSpeed's op is built once per test run (~85 s), in the run's sandbox (tests/conftest.py).
        "deepspeed": {"port": base + 5, "op_cache_dir": os.environ["TORCH_EXTENSIONS_DIR"]},
    }
    for key, value in overrides.items():
        values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) else value
    return Settings(**values)


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def settings(prefect_harness: None) -> Iterator[Settings]:
    """Settings for one module, with the environment pointed at its state folder."""
    yield from module_settings()


# A two-rank DeepSpeed deployment the watchdog restarts (test_watchdog_deepspeed, test_front_deepspeed):
# a slow first start allowed, a silent rank noticed in 5 s, restarts without backoff, 3 in 10 min.
RESTARTED_DEEPSPEED: dict[str, dict[str, object]] = {
    "deepspeed": {"ready_timeout_s": 400, "heartbeat_timeout_s": 5},
    "watchdog": {"max_restarts": 3, "window_s": 600, "backoff_s": 0, "canary_timeout_s": 10},
}


def module_settings(**overrides: object) -> Iterator[Settings]:
    """Settings for one module (see ``settings``); a module overrides that fixture with its own values."""
    saved = dict(os.environ)
    s = make_settings(**overrides)
    # Ray reads its auth token once per process: every module's local instance must use the
    # same token as the first one this test process connected to.
    (s.state.ray).mkdir(parents=True, exist_ok=True)
    (s.state.ray / "auth_token").write_text(_SESSION_RAY_TOKEN)
    configure_process(s)
    yield s
    import ray

    from nodewise.ops.status import stop_everything

    ray.shutdown()
    stop_everything(s)
    os.environ.clear()
    os.environ.update(saved)
    shutil.rmtree(s.state_path, ignore_errors=True)


@pytest.fixture(scope="module")
def digits_model(settings: Settings) -> str:
    from nodewise.demo_models import register_demo_model

    model = register_demo_model(str(settings.state.artifacts))
    return f"models:/{model.name}@champion"


def registered_with_serve_tags(settings: Settings, name: str, **serve: float) -> tuple[str, str]:
    """The demo digits model registered as ``name`` with ``nodewise.serve.*`` tags (how a user
    sets per-model serving options in the registry); returns (name, version)."""
    from mlflow import MlflowClient

    from nodewise.demo_models import register_demo_model

    model = register_demo_model(str(settings.state.artifacts), name=name)
    client = MlflowClient()
    for key, value in serve.items():
        client.set_registered_model_tag(model.name, f"nodewise.serve.{key}", str(value))
    return model.name, model.version
