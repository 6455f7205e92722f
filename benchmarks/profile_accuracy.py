"""Analytic vs measured memory on CPU for a zoo of locally built models, and exact parameter
counts from the configs of well-known open models (no weights).

Zoo (each registered in a throw-away SQLite MLflow): MLP 784-2048x3-10, CNN, tiny Llama,
tiny BERT-like encoder, a generic pyfunc wrapping a torch MLP. Analytic: weights + KV cache +
activations from nodewise's meta-device profiler (no weights read). Measured: peak RSS growth of
a fresh process that loads the model and runs the batch (tasks/planning/measure_subprocess.py). The runtime context
(~0.5 GiB per process, added to both in a plan) is left out of the comparison.

Configs: benchmarks/configs/*.json, transcribed from the models' public config.json files;
expected counts are the published ones.

Usage: .venv/bin/python benchmarks/profile_accuracy.py   (last line: one JSON object)
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._models import zoo  # noqa: E402

PUBLISHED = {  # parameter counts as published (model cards, Hugging Face)
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "meta-llama-3-8b": 8_030_261_248,
    "mistral-7b-v0.1": 7_241_732_096,
    "gpt2": 124_439_808,
    "bert-base-uncased": 109_482_240,
}


def register_all(artifacts: Path) -> dict[str, str]:
    import cloudpickle
    import mlflow
    import torch

    models = zoo()
    exp = mlflow.create_experiment("zoo", artifact_location=f"file://{artifacts}")
    uris = {}
    for name, (module, example) in models.items():
        with mlflow.start_run(experiment_id=exp):
            info = mlflow.pytorch.log_model(
                module,
                name="model",
                input_example=example[:1],
                serialization_format="pickle",
                registered_model_name=name,
                pip_requirements=["torch"],
            )
        uris[name] = f"models:/{name}/{info.registered_model_version}"
    # A generic pyfunc: a torch MLP's state dict as an artifact, loaded in load_context.
    mlp = torch.nn.Sequential(
        torch.nn.Linear(1024, 4096),
        torch.nn.ReLU(),
        torch.nn.Linear(4096, 4096),
        torch.nn.ReLU(),
        torch.nn.Linear(4096, 10),
    )
    weights = artifacts / "pyfunc_weights.pt"
    torch.save(mlp.state_dict(), weights)

    class MlpPyfunc(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            import torch as t

            self.net = t.nn.Sequential(
                t.nn.Linear(1024, 4096), t.nn.ReLU(), t.nn.Linear(4096, 4096), t.nn.ReLU(), t.nn.Linear(4096, 10)
            )
            self.net.load_state_dict(t.load(context.artifacts["weights"]))

        def predict(self, context, model_input, params=None):
            import torch as t

            with t.no_grad():
                return self.net(t.as_tensor(np.asarray(model_input, dtype="float32"))).numpy()

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with mlflow.start_run(experiment_id=exp):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=MlpPyfunc(),
            artifacts={"weights": str(weights)},
            input_example=np.random.rand(32, 1024).astype("float32"),
            registered_model_name="pyfunc-mlp",
            pip_requirements=["torch"],
        )
    uris["pyfunc"] = f"models:/pyfunc-mlp/{info.registered_model_version}"
    return uris


def zoo_accuracy(uris: dict[str, str]) -> list[dict]:
    from mlflow import MlflowClient

    from tasks.planning.profile_models import analytic_profile, measure
    from tasks.planning.registry import resolve_model

    rows = []
    batches = {"mlp": 32, "cnn": 32, "tiny-llama": 4, "tiny-bert": 8, "pyfunc": 32}
    for name, uri in uris.items():
        model = resolve_model(uri, MlflowClient())
        analytic = analytic_profile(model, batch_size=batches[name])
        measured = measure(model, batch_size=batches[name])["cpu_bytes"]
        error = (analytic.analytic_bytes - measured) / measured
        rows.append(
            {
                "model": name,
                "method": analytic.method,
                "params": analytic.param_count,
                "analytic_mib": round(analytic.analytic_bytes / 2**20, 1),
                "weights_mib": round(analytic.weight_bytes / 2**20, 1),
                "activations_mib": round(analytic.activation_bytes / 2**20, 1),
                "kv_mib": round(analytic.kv_cache_bytes / 2**20, 1),
                "measured_mib": round(measured / 2**20, 1),
                "error_pct": round(100 * error, 1),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def config_counts() -> tuple[float, list[dict]]:
    """Seconds to import torch + transformers (once per process), then each count's own seconds."""
    start = time.perf_counter()
    import transformers  # noqa: F401

    from tasks.planning.profiling import load_config, profile_config

    import_seconds = time.perf_counter() - start
    rows = []
    for path in sorted((ROOT / "benchmarks/configs").glob("*.json")):
        start = time.perf_counter()
        count = profile_config(load_config(path), seq_len=1).param_count
        seconds = time.perf_counter() - start
        rows.append(
            {
                "config": path.stem,
                "params": count,
                "published": PUBLISHED.get(path.stem),
                "exact": count == PUBLISHED.get(path.stem),
                "seconds": round(seconds, 2),
            }
        )
    return round(import_seconds, 2), rows


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="nw-zoo-"))
    os.environ.update(
        {
            "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        }
    )
    try:
        import_seconds, counts = config_counts()
        rows = zoo_accuracy(register_all(workdir / "artifacts"))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    errors = [abs(r["error_pct"]) for r in rows]
    print(
        json.dumps(
            {
                "benchmark": "profile_accuracy",
                "zoo": rows,
                "median_abs_error_pct": round(statistics.median(errors), 1),
                "worst_abs_error_pct": round(max(errors), 1),
                "configs": counts,
                "configs_import_seconds": import_seconds,
                "configs_all_exact": all(c["exact"] for c in counts),
                "configs_max_seconds": max(c["seconds"] for c in counts),
            }
        )
    )


if __name__ == "__main__":
    main()
