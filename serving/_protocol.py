"""The MLflow scoring protocol: request bodies in, ``{"predictions": ...}`` out.

Accepts what ``mlflow models serve`` accepts on ``POST /invocations``: JSON with one of
``dataframe_split``, ``dataframe_records``, ``instances`` or ``inputs``, or CSV.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from serving.errors import BadRequest, UnsupportedMediaType, decode_json, encode_json

JSON_KEYS = ("dataframe_split", "dataframe_records", "instances", "inputs")


def parse_body(body: bytes, content_type: str) -> Any:
    """Parse a scoring request into a pandas DataFrame, a numpy array, or a dict of arrays."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "text/csv":
        return _parse_csv(body)
    if media not in ("application/json", ""):
        raise UnsupportedMediaType(f"content type {media!r} is not supported; send application/json or text/csv")
    payload = decode_json(body)
    if not isinstance(payload, dict):
        raise BadRequest(f"JSON body must be an object with one of the keys {list(JSON_KEYS)}")
    keys = [k for k in JSON_KEYS if k in payload]
    if len(keys) != 1:
        raise BadRequest(f"JSON body must have exactly one of the keys {list(JSON_KEYS)}; got {sorted(payload)}")
    return _parse_json(keys[0], payload[keys[0]])


def _parse_json(key: str, value: Any) -> Any:
    import pandas as pd

    if key == "dataframe_split":
        if not isinstance(value, dict) or "data" not in value:
            raise BadRequest('"dataframe_split" must be an object with "columns" and "data"')
        for part in ("columns", "index"):
            labels = value.get(part)
            if labels is not None and not (isinstance(labels, list) and all(map(_is_label, labels))):
                raise BadRequest(f'"dataframe_split" {part} must be a list of names (strings or numbers)')
        try:
            return pd.DataFrame(value["data"], columns=value.get("columns"), index=value.get("index"))
        except (ValueError, TypeError, OverflowError, pd.errors.InvalidIndexError) as e:
            raise BadRequest(f'"dataframe_split" does not form a table: {e}') from e
    if key == "dataframe_records":
        if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
            raise BadRequest('"dataframe_records" must be a list of objects, one per row')
        try:
            return pd.DataFrame.from_records(value)
        except (ValueError, TypeError, OverflowError) as e:
            raise BadRequest(f'"dataframe_records" does not form a table: {e}') from e
    # "instances" and "inputs": a tensor, or a dict of named tensors.
    if isinstance(value, dict):
        return {name: _to_array(name, v) for name, v in value.items()}
    return _to_array(key, value)


def _is_label(value: Any) -> bool:
    """A column or row name: a string or a number (JSON's null, true and false too), never a list or object."""
    return value is None or isinstance(value, str | int | float)


def _to_array(name: str, value: Any) -> np.ndarray:
    try:
        array = np.asarray(value)
    except ValueError as e:
        raise BadRequest(f'"{name}" is not a rectangular array: {e}') from e
    if array.dtype == object:
        raise BadRequest(f'"{name}" is not a rectangular array of numbers or strings')
    return array


def _parse_csv(body: bytes) -> Any:
    import pandas as pd

    try:
        return pd.read_csv(io.BytesIO(body))
    except (ValueError, pd.errors.ParserError) as e:
        raise BadRequest(f"body is not valid CSV: {e}") from e


def to_tensor(data: Any, dtype: str | None, shape: tuple[int, ...] | None) -> np.ndarray:
    """Turn parsed input into the one tensor a tensor-signature model takes, checking its shape."""
    if isinstance(data, dict):
        if len(data) != 1:
            raise BadRequest(f"this model takes one unnamed tensor; got named inputs {sorted(data)}")
        data = next(iter(data.values()))
    array = data.to_numpy() if hasattr(data, "to_numpy") else np.asarray(data)
    if dtype is not None:
        try:
            with np.errstate(over="ignore", invalid="ignore"):
                converted = array.astype(dtype, copy=False)
        except (ValueError, TypeError, OverflowError) as e:
            raise BadRequest(f"input cannot be converted to {dtype}: {e}") from e
        _check_range(array, converted, dtype)
        array = converted
    if shape is not None:
        check_shape(array, shape)
    return array


def _check_range(original: np.ndarray, converted: np.ndarray, dtype: str) -> None:
    """A finite number that becomes infinite (or wraps around) in the model's dtype is refused."""
    if converted.dtype.kind == "f" and original.dtype.kind in "fiu":
        with np.errstate(invalid="ignore", over="ignore"):
            overflow = np.isinf(converted) & np.isfinite(original)
        if overflow.any():
            where = tuple(int(i) for i in np.argwhere(overflow)[0])
            raise BadRequest(f"input value {original[where].item()!r} at {list(where)} is outside the range of {dtype}")
    elif converted.dtype.kind in "iu" and original.dtype.kind in "fiu":
        info = np.iinfo(converted.dtype)
        if original.size and (original.min() < info.min or original.max() > info.max):
            raise BadRequest(f"input values {original.min()}..{original.max()} are outside the range of {dtype}")


def check_shape(array: np.ndarray, shape: tuple[int, ...]) -> None:
    """Raise BadRequest unless ``array`` matches ``shape`` (-1 matches any size)."""
    if array.ndim == len(shape) - 1 and shape[0] == -1:
        raise BadRequest(
            f"input has shape {list(array.shape)}; this model expects a batch of shape "
            f"{list(shape)}: wrap a single row in a list"
        )
    mismatch = array.ndim != len(shape) or any(
        want not in (-1, got) for want, got in zip(shape, array.shape, strict=False)
    )
    if mismatch:
        raise BadRequest(f"input has shape {list(array.shape)}; this model expects {list(shape)}")


def encode_predictions(predictions: Any) -> bytes:
    """Encode model output as ``mlflow models serve`` does: ``{"predictions": ...}`` (one encoder for
    every endpoint: ``serving.errors.encode_json``)."""
    return encode_json({"predictions": _jsonable(predictions)})


def _jsonable(value: Any) -> Any:
    if hasattr(value, "to_dict") and hasattr(value, "columns"):  # DataFrame
        return value.to_dict(orient="records")
    if isinstance(value, np.ndarray) and value.dtype.kind in "fiub" and value.dtype.itemsize <= 8:
        return np.ascontiguousarray(value)  # orjson writes numeric arrays itself, fast
    if hasattr(value, "tolist"):  # other numpy arrays, pandas Series, torch tensors
        return value.tolist()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value
