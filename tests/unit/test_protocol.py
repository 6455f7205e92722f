import json

import numpy as np
import pytest

from serving._protocol import encode_predictions, parse_body, to_tensor
from serving.errors import BadRequest, UnsupportedMediaType


def body(payload: object) -> bytes:
    return json.dumps(payload).encode()


@pytest.mark.parametrize(
    "payload",
    [
        {"inputs": [[1, 2], [3, 4]]},
        {"instances": [[1, 2], [3, 4]]},
        {"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2], [3, 4]]}},
        {"dataframe_records": [{"a": 1, "b": 2}, {"a": 3, "b": 4}]},
    ],
)
def test_every_json_format_gives_the_same_tensor(payload: dict) -> None:
    array = to_tensor(parse_body(body(payload), "application/json"), "float32", (-1, 2))
    np.testing.assert_array_equal(array, np.array([[1, 2], [3, 4]], dtype=np.float32))


def test_csv() -> None:
    array = to_tensor(parse_body(b"a,b\n1,2\n3,4\n", "text/csv"), "float32", (-1, 2))
    assert array.shape == (2, 2)


@pytest.mark.parametrize(
    ("raw", "content_type", "message"),
    [
        (b"{not json", "application/json", "body is not valid JSON"),
        (b"[1, 2]", "application/json", "must be an object with one of the keys"),
        (body({"rows": [[1]]}), "application/json", r"exactly one of the keys .*got \['rows'\]"),
        (body({"inputs": [1], "instances": [1]}), "application/json", "exactly one of the keys"),
        (body({"inputs": [[1, 2], [3]]}), "application/json", "not a rectangular array"),
        (body({"dataframe_split": [1, 2]}), "application/json", '"dataframe_split" must be an object'),
    ],
)
def test_bad_bodies(raw: bytes, content_type: str, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        parse_body(raw, content_type)


def test_unsupported_content_type_is_415_like_mlflow() -> None:
    with pytest.raises(UnsupportedMediaType, match="content type 'application/xml' is not supported"):
        parse_body(b"x", "application/xml")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([[1, 2, 3]], r"input has shape \[1, 3\]; this model expects \[-1, 2\]"),
        ([1, 2], r"wrap a single row in a list"),
        ([["a", "b"]], "cannot be converted to float32"),
    ],
)
def test_shape_and_type_checks_name_the_problem(data: list, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        to_tensor(np.asarray(data), "float32", (-1, 2))


def test_predictions_are_encoded_like_mlflow_serve() -> None:
    assert json.loads(encode_predictions(np.array([[0.5, 1.5]]))) == {"predictions": [[0.5, 1.5]]}
