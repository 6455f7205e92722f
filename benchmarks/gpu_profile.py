"""Analytic vs measured memory on CUDA (target: within 5%), for the torch models of
profile_accuracy.py's zoo (the generic pyfunc is left out: it is opaque by design).

Analytic: nodewise's meta-device profile (``tasks.planning.profiling.profile_module``, device "cuda":
no attention-score matrices, as SDPA kernels never hold them). Measured: the bytes PyTorch's
allocator held at its peak (``max_memory_allocated``) while the model was moved to the GPU and
ran its batch; the CUDA context and cuBLAS's workspace are outside both (they are the plan's
per-process runtime share). Each model is
measured after the previous one was freed (allocator statistics are exact per process).
Needs only torch, transformers and pydantic, so it runs on a bare GPU machine without MLflow.
Where there is no CUDA device it says so and exits 0.

Usage: .venv/bin/python benchmarks/gpu_profile.py   (last line: one JSON object)
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"benchmark": "gpu_profile", "skipped": "no CUDA device on this machine"}))
        return
    from benchmarks._models import zoo
    from tasks.planning.profiling import profile_module

    with torch.device("meta"):
        meta = zoo()
    # cuBLAS allocates its workspace (32 MiB on Hopper) through PyTorch's allocator on the first
    # matmul of a process: per-process runtime (the plan's runtime share), not model memory.
    torch.nn.Linear(8, 8, device="cuda")(torch.zeros(2, 8, device="cuda"))
    torch.cuda.synchronize()
    rows = []
    for name, (module, example) in zoo().items():
        analytic = profile_module(meta[name][0], example, device="cuda").analytic_bytes
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.inference_mode():
            on_gpu = module.eval().to("cuda")
            on_gpu(torch.as_tensor(example).to("cuda"))
            torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated() - base
        del on_gpu, module
        rows.append(
            {
                "model": name,
                "analytic_mib": round(analytic / 2**20, 1),
                "measured_mib": round(measured / 2**20, 1),
                "error_pct": round(100 * (analytic - measured) / measured, 1),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    errors = [abs(r["error_pct"]) for r in rows]
    print(
        json.dumps(
            {
                "benchmark": "gpu_profile",
                "device": torch.cuda.get_device_name(0),
                "torch": torch.__version__,
                "zoo": rows,
                "median_abs_error_pct": statistics.median(errors),
                "worst_abs_error_pct": max(errors),
            }
        )
    )


if __name__ == "__main__":
    main()
