"""A benchmark's own nodewise instance: a fresh state folder under /tmp (Ray's socket paths stay
short), fixed ports, DeepSpeed's op cache shared with the tests, and everything stopped after
(the state folder kept, and named, when the run failed)."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def local_instance(prefix: str, base_port: int, **sections: Any) -> Iterator[Any]:
    """Settings for a run on ``base_port`` (Ray), +4 (Serve), +5 (rank 0); ``sections`` merge on top."""
    from nodewise.core.runtime import configure_process
    from nodewise.core.settings import Settings
    from nodewise.ops.status import stop_everything

    state = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    op_cache = os.environ.get("TORCH_EXTENSIONS_DIR") or str(ROOT / ".nodewise" / "torch_extensions")
    values: dict[str, Any] = {
        "ray": {"port": base_port, "num_cpus": 2},
        "serve": {"port": base_port + 4},
        "deepspeed": {"port": base_port + 5, "op_cache_dir": op_cache},
    }
    for key, value in sections.items():
        values[key] = {**values.get(key, {}), **value}
    settings = Settings(state_dir=state, **values)
    configure_process(settings)
    ok = False
    try:
        yield settings
        ok = True
    finally:
        import ray

        ray.shutdown()
        stop_everything(settings)
        if ok:
            shutil.rmtree(state, ignore_errors=True)
        else:
            print(f"state kept in {state}", file=sys.stderr)
