"""Measured memory of one model in an isolated process (a subprocess entry point):
``python -m tasks.planning.measure_subprocess URI FLAVOR DEVICE BATCH``.

Prints one JSON line: the bytes the model added on top of the process's baseline, on CPU the
peak RSS growth, on CUDA ``max_memory_allocated`` (and the non-torch memory NVML sees).
"""

from __future__ import annotations

import json
import resource
import sys


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> int:
    """Reset the RSS high-water mark (Linux >= 4.0) and return the current RSS in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return _status_kib("VmRSS") * 1024
    except OSError:  # not Linux: fall back to the lifetime peak
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_rss() -> int:
    try:
        return _status_kib("VmHWM") * 1024
    except (OSError, RuntimeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(uri: str, flavor: str, device: str, batch: int) -> dict[str, int]:
    import mlflow
    import mlflow.pyfunc
    import mlflow.pytorch
    import torch

    from tasks.planning.registry import artifact_file, load_input_example, make_client, resolve_model, tile_example

    model = resolve_model(uri, make_client(mlflow.get_tracking_uri(), mlflow.get_registry_uri()))
    example, _ = load_input_example(model)
    inputs = tile_example(example, batch) if flavor == "pytorch" else example  # a pyfunc takes its example as typed
    torch.nn.Linear(8, 8)(torch.zeros(2, 8))  # warm torch's lazy state before the baseline
    if flavor == "pytorch":
        # Unpickle once onto the meta device: imports the model's classes (e.g. transformers),
        # which is per-process runtime, not model memory, without allocating any weights.
        with artifact_file(model, "data/model.pth") as path:
            if path is not None:
                torch.load(path, map_location="meta", weights_only=False)
    if device.startswith("cuda"):
        torch.cuda.init()
        # cuBLAS's workspace comes from the first matmul: per-process runtime, not the model's.
        torch.nn.Linear(8, 8, device=device)(torch.zeros(2, 8, device=device))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
    import gc

    gc.collect()
    baseline = _reset_peak()
    with torch.inference_mode():
        if flavor == "pytorch":
            module = mlflow.pytorch.load_model(uri, map_location=device).eval()
            module(torch.as_tensor(inputs).to(device))
        else:
            mlflow.pyfunc.load_model(uri).predict(inputs)
    result = {"cpu_bytes": max(0, _peak_rss() - baseline)}
    if device.startswith("cuda"):
        result["cuda_bytes"] = int(torch.cuda.max_memory_allocated()) - cuda_base
        result["cuda_reserved_bytes"] = int(torch.cuda.memory_reserved())
    return result


if __name__ == "__main__":
    uri, flavor, device, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    print(json.dumps(main(uri, flavor, device, batch)))
