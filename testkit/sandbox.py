"""Every library's state in a temporary folder, set in the environment on import: import this before
anything imports Prefect, MLflow, Ray or torch (tests/conftest.py does; so does a benchmark that
runs the tests' helpers). Nothing lands in $HOME."""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

SANDBOX = Path(tempfile.mkdtemp(prefix="nw-tests-"))
# Ray reads its auth token once per process, possibly while a test module is collected (importing
# ray.serve): from the start, this process's token is the one every test's Ray instance uses.
RAY_TEST_TOKEN = secrets.token_hex(32)
(SANDBOX / "ray_token").write_text(RAY_TEST_TOKEN)
os.environ.update(
    {
        "PREFECT_HOME": str(SANDBOX / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "MLFLOW_TRACKING_URI": f"sqlite:///{SANDBOX / 'mlflow.db'}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "TORCH_EXTENSIONS_DIR": str(SANDBOX / "torch_extensions"),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TMPDIR": str(SANDBOX / "ray"),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(SANDBOX / "ray_token"),
        # Read once per process too: every Ray of the tests is a one-machine Ray (node address
        # 127.0.0.1), as nodewise's local instance is, so this process's driver matches each of them.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "NODEWISE_STATE_DIR": str(SANDBOX / "state"),
    }
)
for _name in list(os.environ):
    if _name.startswith("NODEWISE_") and _name != "NODEWISE_STATE_DIR":
        del os.environ[_name]
