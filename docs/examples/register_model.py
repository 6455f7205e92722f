"""Register a model the way nodewise serves it best: a signature, an input example, an alias.

Run with MLFLOW_TRACKING_URI set to the registry nodewise reads (NODEWISE_MLFLOW__TRACKING_URI);
tests/unit/test_docs.py runs this file as the deploy guide shows it.
"""

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.models import infer_signature

NAME = "my-model"

# Your model: any torch module (here a small classifier of 20 features into 3 classes).
model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3)).eval()
example = np.random.default_rng(0).random((4, 20), dtype=np.float32)
with torch.no_grad():
    output = model(torch.from_numpy(example)).numpy()

with mlflow.start_run():
    info = mlflow.pytorch.log_model(
        model,
        name="model",
        signature=infer_signature(example, output),  # the endpoint checks requests against it (400 if not)
        input_example=example[:2],  # the smoke test sends it, and the profiler measures with it
        serialization_format="pickle",  # takes any batch size, so requests can be batched
        registered_model_name=NAME,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
    )

version = info.registered_model_version
MlflowClient().set_registered_model_alias(NAME, "champion", version)
print(f"registered models:/{NAME}/{version}, alias @champion")
