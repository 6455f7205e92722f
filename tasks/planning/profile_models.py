"""Profiling registered models: analytic (meta device), measured (isolated process), cached as tags."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from nodewise.core.errors import ProfilingFailed
from nodewise.core.runtime import SOURCE_ROOT
from tasks.planning.profiling import MemoryProfile, load_config, profile_config, profile_module
from tasks.planning.registry import ResolvedModel, artifact_file, load_input_example, tile_example

PROFILE_TAG = "nodewise.profile"


def analytic_profile(
    model: ResolvedModel, *, dtype: str | None = None, batch_size: int = 1, device: str = "cpu"
) -> MemoryProfile:
    """Profile from the artifacts without materialising weights; weights-only where no better exists."""
    if "transformers" in model.flavors:
        with artifact_file(model, "model/config.json") as config:
            if config is not None:
                return profile_config(load_config(config), dtype=dtype, batch_size=batch_size, device=device)
    if model.flavor == "pytorch" and model.pytorch_format != "pt2":
        with artifact_file(model, "data/model.pth") as path:
            if path is not None:
                import torch

                module = torch.load(path, map_location="meta", weights_only=False)
                example, _ = load_input_example(model)
                return profile_module(module, tile_example(example, batch_size), dtype=dtype, device=device)
    # An opaque pyfunc: its artifacts are what it loads. load_context deserialises them (one copy)
    # into the objects it builds (a second copy, e.g. a module and its state dict); on CPU both
    # are alive together while it loads, so the peak holds both.
    return MemoryProfile(
        method="weights-only",
        weight_bytes=model.artifact_bytes,
        load_copy_bytes=model.artifact_bytes if device == "cpu" else 0,
        notes=["opaque pyfunc: weights = artifact size, plus one transient copy while load_context runs (CPU)"],
    )


def measure(
    model: ResolvedModel, *, device: str = "cpu", batch_size: int = 1, timeout_s: float = 600
) -> dict[str, int]:
    """Run the input example through the model in a fresh process; bytes the model added."""
    cmd = [
        sys.executable,
        "-m",
        "tasks.planning.measure_subprocess",
        model.pinned_uri,
        model.flavor,
        device,
        str(batch_size),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SOURCE_ROOT), os.environ.get("PYTHONPATH", "")])}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
    except subprocess.TimeoutExpired as e:
        raise ProfilingFailed(f"measuring {model.pinned_uri} took over {timeout_s:.0f} s") from e
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ProfilingFailed(f"measuring {model.pinned_uri} on {device} failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def profile_registered(
    model: ResolvedModel, *, dtype: str | None = None, batch_size: int = 1, device: str = "cpu", measured: bool = True
) -> MemoryProfile:
    """Analytic profile, and (if ``measured``) the measured one next to it: the plan uses the larger."""
    analytic = analytic_profile(model, dtype=dtype, batch_size=batch_size, device=device)
    if not measured:
        return analytic
    try:
        numbers = measure(model, device=device, batch_size=batch_size)
    except ProfilingFailed as e:
        # The deploy's own health and smoke checks still stop a model that cannot run.
        return analytic.model_copy(update={"notes": [*analytic.notes, f"{e}; using the analytic estimate"]})
    value = numbers.get("cuda_bytes", numbers["cpu_bytes"])
    method = "analytic+measured" if analytic.method == "analytic" else "measured"
    return analytic.model_copy(update={"measured_bytes": value, "method": method})


def cache_key(dtype: str | None, batch_size: int, device: str) -> str:
    return f"{PROFILE_TAG}.{dtype or 'native'}.b{batch_size}.{device.split(':')[0]}"


def cached_profile(model: ResolvedModel, key: str) -> MemoryProfile | None:
    """A profile stored on the model version by an earlier deploy."""
    raw = model.tags.get(key)
    return MemoryProfile.model_validate_json(raw) if raw else None


def store_profile(model: ResolvedModel, key: str, profile: MemoryProfile) -> None:
    from mlflow import MlflowClient

    MlflowClient().set_model_version_tag(model.name, model.version, key, profile.model_dump_json())


def profile_with_cache(
    model: ResolvedModel, *, batch_size: int = 1, device: str = "cpu", dtype: str | None = None
) -> MemoryProfile:
    """The profile a deploy uses: cached on the version's tags, else analytic + measured (and cached)."""
    if device == "cuda" and not cuda_here():
        device = "cpu"  # GPU targets elsewhere: weights and activations weigh the same on the host
    key = cache_key(dtype, batch_size, device)
    cached = cached_profile(model, key)
    if cached is not None:
        return cached
    profile = profile_registered(model, dtype=dtype, batch_size=batch_size, device=device)
    store_profile(model, key, profile)
    return profile


def cuda_here() -> bool:
    import torch

    return bool(torch.cuda.is_available())
