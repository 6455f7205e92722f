"""Loading a registered model inside a serving process and running it."""

from __future__ import annotations

from typing import Any

import numpy as np

from serving._protocol import BadRequest, to_tensor
from serving.spec import ModelServeSpec


class LoadedModel:
    """A model ready to predict: a torch module (fast path) or an MLflow pyfunc."""

    def __init__(self, spec: ModelServeSpec, model: Any) -> None:
        self.spec = spec
        self._model = model

    @classmethod
    def load(cls, spec: ModelServeSpec) -> LoadedModel:
        """Load the model that ``spec`` names, on ``spec.device``."""
        import mlflow

        mlflow.set_tracking_uri(spec.tracking_uri)
        mlflow.set_registry_uri(spec.registry_uri)
        if spec.flavor == "pytorch":
            import torch

            torch.set_num_threads(spec.torch_threads)
            module = mlflow.pytorch.load_model(spec.model_uri, map_location=spec.device)
            if hasattr(module, "eval"):
                module.eval()
            return cls(spec, module)
        return cls(spec, mlflow.pyfunc.load_model(spec.model_uri))

    @property
    def batches(self) -> bool:
        """Whether requests can be concatenated row-wise into one forward pass."""
        return self.spec.flavor == "pytorch"

    def prepare(self, data: Any) -> Any:
        """Validate parsed request data; for the tensor path, return the input array."""
        if self.spec.flavor == "pytorch":
            return to_tensor(data, self.spec.input_dtype, self.spec.input_shape)
        return data

    def predict_tensor(self, array: np.ndarray) -> np.ndarray:
        """One forward pass of the torch module over a batch of rows."""
        import torch

        with torch.inference_mode():
            out = self._model(torch.from_numpy(np.ascontiguousarray(array)).to(self.spec.device))
        if isinstance(out, tuple | list):
            out = out[0]
        if hasattr(out, "logits"):
            out = out.logits
        return out.detach().cpu().numpy()

    def predict(self, data: Any) -> Any:
        """Predict one request's worth of data through the model's own interface."""
        if self.spec.flavor == "pytorch":
            return self.predict_tensor(data)
        try:
            return self._model.predict(data)
        except Exception as e:
            # MLflow's schema enforcement raises MlflowException for bad input.
            if type(e).__name__ == "MlflowException" and "schema" in str(e).lower():
                raise BadRequest(str(e).splitlines()[0]) from e
            raise
