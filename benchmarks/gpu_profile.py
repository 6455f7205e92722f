"""Analytic vs measured memory on CUDA (target: within 5%), for the same zoo as profile_accuracy.py.

Measured: torch.cuda.max_memory_allocated() in a fresh process (tasks/_measure.py with device
cuda), which excludes the CUDA context; analytic: nodewise's meta-device profile. Where there is
no CUDA device it says so and exits 0.

Usage: .venv/bin/python benchmarks/gpu_profile.py   (last line: one JSON object)
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"benchmark": "gpu_profile", "skipped": "no CUDA device on this machine"}))
        return
    from mlflow import MlflowClient

    from benchmarks.profile_accuracy import register_all
    from tasks.profile_models import analytic_profile, measure
    from tasks.registry import resolve_model

    workdir = Path(tempfile.mkdtemp(prefix="nw-gpu-"))
    os.environ.update({"MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}", "MLFLOW_DISABLE_TELEMETRY": "true"})
    rows = []
    try:
        uris = register_all(workdir / "artifacts")
        batches = {"mlp": 32, "cnn": 32, "tiny-llama": 4, "tiny-bert": 8}
        for name, batch in batches.items():
            model = resolve_model(uris[name], MlflowClient())
            analytic = analytic_profile(model, batch_size=batch).analytic_bytes
            measured = measure(model, device="cuda", batch_size=batch)["cuda_bytes"]
            rows.append(
                {
                    "model": name,
                    "analytic_mib": round(analytic / 2**20, 1),
                    "measured_mib": round(measured / 2**20, 1),
                    "error_pct": round(100 * (analytic - measured) / measured, 1),
                }
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    errors = [abs(r["error_pct"]) for r in rows]
    print(
        json.dumps(
            {
                "benchmark": "gpu_profile",
                "device": torch.cuda.get_device_name(0),
                "zoo": rows,
                "median_abs_error_pct": statistics.median(errors),
                "worst_abs_error_pct": max(errors),
            }
        )
    )


if __name__ == "__main__":
    main()
