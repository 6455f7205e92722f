"""The demo model: a small torch MLP trained on scikit-learn's digits (shipped with scikit-learn)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

DEMO_MODEL = "nodewise-digits"
DEMO_EXPERIMENT = "nodewise-demo"
DEMO_TAG = "nodewise.demo"


@dataclass(frozen=True)
class DemoModel:
    name: str
    version: str
    accuracy: float
    trained: bool


def digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The 8x8 digits as float32 rows in [0, 1]: train X, train y, test X, test y."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.2, random_state=seed, stratify=digits.target
    )
    return x_train, y_train, x_test, y_test


def train_digits(epochs: int = 40, seed: int = 0) -> tuple[object, float]:
    """Train a 64-128-64-10 MLP; return the module and its test accuracy."""
    import torch

    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = digits_split(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    xs, ys = torch.from_numpy(x_train), torch.from_numpy(y_train).long()
    for _ in range(epochs):
        for idx in torch.randperm(len(xs)).split(64):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xs[idx]), ys[idx])
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    return model, accuracy


def register_demo_model(
    artifact_root: str, name: str = DEMO_MODEL, alias: str = "champion", retrain: bool = False
) -> DemoModel:
    """Train and register the demo model with a signature and input example; set ``alias``.

    Reuses the version under ``alias`` when it is a demo model already, unless ``retrain``.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.models import infer_signature

    client = MlflowClient()
    if not retrain:
        try:
            current = client.get_model_version_by_alias(name, alias)
        except MlflowException:
            current = None
        if current is not None and DEMO_TAG in (current.tags or {}):
            return DemoModel(name, str(current.version), float(current.tags[DEMO_TAG]), False)
    experiment = client.get_experiment_by_name(DEMO_EXPERIMENT)
    experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment(DEMO_EXPERIMENT, artifact_location=f"file://{artifact_root}")
    )
    model, accuracy = train_digits()
    _, _, x_test, _ = digits_split()
    import torch

    with torch.no_grad():
        logits = model(torch.from_numpy(x_test[:4])).numpy()  # type: ignore[operator]
    # Explicit requirements: MLflow's inference takes seconds and warns about torch's "+cpu".
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]
    quiet = logging.getLogger("mlflow.pytorch")
    level, quiet.level = quiet.level, logging.ERROR  # the pickle caution: we chose pickle
    with mlflow.start_run(experiment_id=experiment_id, run_name="digits-mlp"):
        mlflow.log_metric("test_accuracy", accuracy)
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            signature=infer_signature(x_test[:4], logits),
            input_example=x_test[:2],
            serialization_format="pickle",  # pickle: any batch size
            registered_model_name=name,
            pip_requirements=requirements,
        )
    quiet.setLevel(level)
    version = str(info.registered_model_version)
    client.set_model_version_tag(name, version, DEMO_TAG, f"{accuracy:.4f}")
    client.set_registered_model_alias(name, alias, version)
    return DemoModel(name, version, accuracy, True)
