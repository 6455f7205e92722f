"""Small pyfunc models the integration tests register (pickled by value: replicas cannot import tests/)."""

from __future__ import annotations

import mlflow.pyfunc
import numpy as np
import pandas as pd


class DoubleIt(mlflow.pyfunc.PythonModel):
    """A generic pyfunc: returns twice its input."""

    def predict(self, context, model_input: list[list[float]], params=None) -> list[list[float]]:
        return (np.asarray(model_input, dtype=float) * 2).tolist()


class TimesIt(mlflow.pyfunc.PythonModel):
    """``factor`` times its input (a rollout's champion, a like challenger, or an unlike one)."""

    def __init__(self, factor: float = 2.0) -> None:
        self.factor = factor

    def predict(self, context, model_input: list[list[float]], params=None) -> list[list[float]]:
        return (np.asarray(model_input, dtype=float) * self.factor).tolist()


class FailsOnLarge(mlflow.pyfunc.PythonModel):
    """Twice its input, but fails (a 500) on any value over 10: a challenger with a bug its smoke
    request does not show."""

    def predict(self, context, model_input: list[list[float]], params=None) -> list[list[float]]:
        values = np.asarray(model_input, dtype=float)
        if (values > 10).any():
            raise RuntimeError("a bug in this version: values over 10")
        return (values * 2).tolist()


class BrokenOnLoad(mlflow.pyfunc.PythonModel):
    """Fails while a replica loads it: the deploy must roll back."""

    def load_context(self, context):
        raise RuntimeError("this model cannot load")

    def predict(self, context, model_input: list[list[float]], params=None) -> list[list[float]]:
        return model_input


class AddColumns(mlflow.pyfunc.PythonModel):
    """A column-schema pyfunc (a: double, b: double) -> a + b; fails (a 500) when a < -1000."""

    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[float]:
        if (model_input["a"] < -1000).any():
            raise RuntimeError("a is below -1000: a bug in this model")
        return (model_input["a"] + model_input["b"]).tolist()


class FaultOnFlag(mlflow.pyfunc.PythonModel):
    """Twice its input, until a flag file names the replica's pid: ``PID.fail`` makes every
    request fail, ``PID.leak`` keeps more memory per request (the file's number of MiB, 64 if empty)."""

    def __init__(self, flag_dir: str) -> None:
        self.flag_dir = flag_dir
        self.kept: list[np.ndarray] = []

    def predict(self, context, model_input: list[list[float]], params=None) -> list[list[float]]:
        import os

        flag = f"{self.flag_dir}/{os.getpid()}"
        if os.path.exists(f"{flag}.fail"):
            raise RuntimeError("injected fault: this replica fails every request")
        if os.path.exists(f"{flag}.leak"):
            with open(f"{flag}.leak") as f:
                mib = float(f.read().strip() or 64)
            self.kept.append(np.ones(int(mib * 2**20) // 8))  # every page touched
        return (np.asarray(model_input, dtype=float) * 2).tolist()


def register_pyfunc(model: mlflow.pyfunc.PythonModel, name: str, artifact_root: str, example: object = None) -> str:
    """Log ``model`` with an input example, register it, return models:/NAME/VERSION."""
    import sys

    import cloudpickle
    from mlflow import MlflowClient

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    client = MlflowClient()
    exp = client.get_experiment_by_name("tests") or None
    exp_id = (
        exp.experiment_id if exp else client.create_experiment("tests", artifact_location=f"file://{artifact_root}")
    )
    example = np.array([[1.0, 2.0, 3.0]], dtype=np.float64) if example is None else example
    with mlflow.start_run(experiment_id=exp_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=model,
            input_example=example,
            registered_model_name=name,
            pip_requirements=["numpy"],
        )
    return f"models:/{name}/{info.registered_model_version}"


def register_unservable(name: str, artifact_root: str) -> str:
    """A registered model whose only flavour nodewise cannot serve."""
    import tempfile

    from mlflow import MlflowClient
    from mlflow.models import Model

    client = MlflowClient()
    exp = client.get_experiment_by_name("tests")
    exp_id = (
        exp.experiment_id if exp else client.create_experiment("tests", artifact_location=f"file://{artifact_root}")
    )
    with mlflow.start_run(experiment_id=exp_id) as run, tempfile.TemporaryDirectory() as tmp:
        Model(flavors={"onnx_custom": {"data": "model.onnx"}}).save(f"{tmp}/MLmodel")
        mlflow.log_artifacts(tmp, artifact_path="model")
        version = mlflow.register_model(f"runs:/{run.info.run_id}/model", name)
    return f"models:/{name}/{version.version}"
