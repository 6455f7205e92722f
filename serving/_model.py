"""Loading a registered model inside a serving process and running it."""

from __future__ import annotations

from typing import Any

import numpy as np

from serving._protocol import BadRequest, UnsupportedMediaType, parse_body, to_tensor
from serving.spec import ModelServeSpec, resolve_uri


class LoadedModel:
    """A model ready to predict: a torch module (fast path) or an MLflow pyfunc."""

    def __init__(self, spec: ModelServeSpec, model: Any) -> None:
        self.spec = spec
        self._model = model

    @classmethod
    def load(cls, spec: ModelServeSpec) -> LoadedModel:
        """Load the model that ``spec`` names, on ``spec.device``."""
        import mlflow

        mlflow.set_tracking_uri(resolve_uri(spec.tracking_uri, "MLFLOW_TRACKING_URI"))
        mlflow.set_registry_uri(resolve_uri(spec.registry_uri, "MLFLOW_REGISTRY_URI"))
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

    def pipeline(self) -> Any:
        """The transformers pipeline under an MLflow transformers pyfunc (its model and tokenizer)."""
        pipeline = getattr(getattr(self._model, "_model_impl", None), "pipeline", None)
        if pipeline is None or getattr(pipeline, "model", None) is None:
            raise TypeError(f"{self.spec.model_uri} is not a transformers pipeline model; the engine cannot serve it")
        return pipeline

    def parse(self, body: bytes, content_type: str) -> Any:
        """Parse and validate a scoring request into this model's input.

        Torch models take one tensor: our parser, checked against the signature's dtype and shape.
        Any other pyfunc goes through MLflow's own scoring-server parser, so it sees exactly
        what `mlflow models serve` would give it (type-hinted models included).
        """
        if self.spec.flavor == "pytorch":
            return to_tensor(parse_body(body, content_type), self.spec.input_dtype, self.spec.input_shape)
        return self._parse_pyfunc(body, content_type)

    def _parse_pyfunc(self, body: bytes, content_type: str) -> Any:
        import io

        from mlflow.exceptions import MlflowException
        from mlflow.pyfunc import scoring_server

        metadata = self._model.metadata
        schema = metadata.get_input_schema()
        media = content_type.split(";", 1)[0].strip().lower()
        try:
            if media == "text/csv":
                return scoring_server.parse_csv_input(io.StringIO(body.decode()), schema)
            if media not in ("application/json", ""):
                raise UnsupportedMediaType(
                    f"content type {media!r} is not supported; send application/json or text/csv"
                )
            return scoring_server._parse_json_data(body.decode(), metadata, schema).data
        except (MlflowException, UnicodeDecodeError, ValueError) as e:
            raise BadRequest(_client_message(e)) from e

    def predict_tensor(self, array: np.ndarray) -> np.ndarray:
        """One forward pass of the torch module over a batch of rows."""
        import torch

        with torch.inference_mode():
            out = self._model(torch.from_numpy(np.ascontiguousarray(array)).to(self.spec.device))
        if hasattr(out, "logits"):
            out = out.logits
        elif hasattr(out, "to_tuple"):  # a transformers ModelOutput without logits
            out = out.to_tuple()[0]
        if isinstance(out, tuple | list):
            out = out[0]
        return out.detach().cpu().numpy()

    def predict(self, data: Any) -> Any:
        """Predict one request's worth of data through the model's own interface."""
        if self.spec.flavor == "pytorch":
            return self.predict_tensor(data)
        from mlflow.exceptions import MlflowException

        try:
            return self._model.predict(data)
        except MlflowException as e:
            # Schema enforcement (missing columns, wrong types) is the client's to fix.
            if e.error_code == "INVALID_PARAMETER_VALUE" or "schema" in str(e).lower():
                raise BadRequest(_client_message(e)) from e
            raise


def _client_message(error: Exception) -> str:
    """The part of an MLflow schema error a client can act on, on one line.

    MLflow's messages quote the whole offending table first and put the cause last
    ("... Error: Model is missing inputs ['b']")."""
    text = str(error)
    if "Error: " in text:
        text = text.rsplit("Error: ", 1)[1]
    return " ".join(text.split())[:500]
