"""The CLI as a user runs it: a user's environment (own state folder, free ports, own home).
A state folder's processes and removing it: nodewise/ops/processes.py."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from nodewise.core.procs import free_port_block

NODEWISE = str(Path(sys.executable).with_name("nodewise"))


def user_environment(prefix: str) -> tuple[Path, dict[str, str]]:
    """A fresh state folder and free ports, as a user's shell would set them; nothing of the tests'."""
    state = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    base = free_port_block(6)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "NODEWISE_"))}
    env.update(
        {
            "NODEWISE_STATE_DIR": str(state),
            "NODEWISE_RAY__PORT": str(base),
            "NODEWISE_SERVE__PORT": str(base + 4),
            "NODEWISE_SERVE__REPLICAS": "1",
            "NODEWISE_DEEPSPEED__PORT": str(base + 5),
            # DeepSpeed's compiled op, built once per test run (a user's machine builds it once too).
            "NODEWISE_DEEPSPEED__OP_CACHE_DIR": os.environ["TORCH_EXTENSIONS_DIR"],
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "HOME": str(state / "home"),  # a user's home: nothing of nodewise's libraries may land in it
        }
    )
    (state / "home").mkdir()
    return state, env


def run(env: dict[str, str], *args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    return subprocess.run([NODEWISE, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)
