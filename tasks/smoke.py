"""The smoke test after a deploy: the endpoint answers the input example like the model itself."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from pydantic import BaseModel

from nodewise.core.errors import DeployFailed
from nodewise.core.settings import SmokeSettings
from tasks.planning.registry import ResolvedModel, load_input_example


class SmokeResult(BaseModel):
    """What the endpoint answered, and how it compared with the model run locally."""

    request: dict[str, Any]
    prediction: Any
    compared: bool
    max_abs_diff: float | None = None


def reference_predict(model: ResolvedModel, example: Any) -> Any:
    """Run the model in this process on ``example``, the way the server does."""
    import mlflow

    if model.flavor == "pytorch":
        import torch

        module = mlflow.pytorch.load_model(model.pinned_uri, map_location="cpu")
        module.eval()
        with torch.inference_mode():
            out = module(torch.as_tensor(np.asarray(example, dtype=model.input_dtype or "float32")))
        return getattr(out, "logits", out).numpy()
    return mlflow.pyfunc.load_model(model.pinned_uri).predict(example)


def endpoint_health(endpoint: str, timeout_s: float = 2.0) -> str:
    """``healthy``, ``unreachable`` or ``unhealthy (HTTP N: problems)`` from the endpoint's ``/ping``
    (DeepSpeed's rank 0 and front name the ranks that are the trouble): ``nodewise status``'s column."""
    import httpx

    try:
        response = httpx.get(f"{endpoint}/ping", timeout=timeout_s)
    except httpx.TransportError:
        return "unreachable"
    if response.status_code == 200:
        return "healthy"
    try:
        problems = "; ".join(response.json().get("problems", []))
    except ValueError:
        problems = ""
    return f"unhealthy (HTTP {response.status_code}{': ' + problems if problems else ''})"


def post_json(url: str, body: dict[str, Any], timeout_s: float) -> Any:
    """POST ``body``; retry connection errors and 404/503 (route not live yet) until the deadline."""
    import httpx

    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            response = httpx.post(url, json=body, timeout=timeout_s)
        except httpx.TransportError as e:
            last = f"{type(e).__name__}: {e}"
        else:
            if response.status_code == 200:
                return response.json()
            last = f"HTTP {response.status_code}: {response.text[:300]}"
            if response.status_code not in (404, 503):
                break
        time.sleep(0.5)
    raise DeployFailed(f"smoke test: POST {url} failed ({last})")


def smoke_test(endpoint: str, model: ResolvedModel, settings: SmokeSettings) -> SmokeResult:
    """Send the model's input example to ``endpoint`` and compare with the model's own output.

    Raises:
        DeployFailed: no answer, an error status, or outputs that differ beyond tolerance.
    """
    example, body = load_input_example(model)
    if example is None and body is not None:
        example = _example_from_body(body)
    if example is None:
        raise DeployFailed(
            f"model {model.pinned_uri} has no input example, so it cannot be smoke-tested; "
            "log it with input_example=... (mlflow.pytorch.log_model / mlflow.pyfunc.log_model)"
        )
    if body is None:
        body = {"inputs": np.asarray(example).tolist()}
    answer = post_json(f"{endpoint}/invocations", body, settings.timeout_s)
    prediction = answer.get("predictions", answer) if isinstance(answer, dict) else answer
    if model.artifact_bytes > settings.reference_max_bytes:
        return SmokeResult(request=body, prediction=prediction, compared=False)
    reference = reference_predict(model, example)
    if not _numeric(reference):
        # Text (a generation pipeline): its pyfunc may sample, so two runs need not agree. The
        # endpoint must answer one text per input; the engine's greedy tokens are tested elsewhere.
        if len(_as_texts(prediction)) != len(_as_texts(reference)):
            raise DeployFailed(
                f"smoke test: the endpoint gave {len(_as_texts(prediction))} texts for "
                f"{len(_as_texts(reference))} inputs"
            )
        return SmokeResult(request=body, prediction=prediction, compared=False)
    expected = _as_array(reference)
    got = _as_array(prediction)
    if expected.shape != got.shape or not np.allclose(got, expected, rtol=settings.rtol, atol=settings.atol):
        diff = float(np.max(np.abs(got - expected))) if expected.shape == got.shape else float("inf")
        raise DeployFailed(
            f"smoke test: the endpoint's output differs from the model's own (shape "
            f"{list(got.shape)} vs {list(expected.shape)}, max abs diff {diff:.3g})"
        )
    diff = float(np.max(np.abs(got - expected))) if got.size else 0.0
    return SmokeResult(request=body, prediction=prediction, compared=True, max_abs_diff=diff)


def _example_from_body(body: dict[str, Any]) -> Any:
    """The input inside MLflow's saved request body, for the local reference prediction."""
    for key in ("inputs", "instances"):
        if key in body:
            return body[key]
    if "dataframe_split" in body:
        import pandas as pd

        split = body["dataframe_split"]
        return pd.DataFrame(split.get("data"), columns=split.get("columns"))
    return None


def _numeric(value: Any) -> bool:
    try:
        _as_array(value)
    except (TypeError, ValueError):
        return False
    return True


def _as_texts(value: Any) -> list[str]:
    if hasattr(value, "to_numpy"):
        value = value.to_numpy()
    return [str(v) for v in np.asarray(value, dtype=object).reshape(-1)]


def _as_array(value: Any) -> np.ndarray:
    if hasattr(value, "to_numpy"):
        value = value.to_numpy()
    return np.asarray(value, dtype=float)
