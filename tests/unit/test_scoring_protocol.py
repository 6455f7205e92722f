import io
import json

import numpy as np
import pytest

from serving._protocol import encode_predictions, parse_body, to_tensor
from serving.errors import (
    BadRequest,
    ClientTimeout,
    PayloadTooLarge,
    UnsupportedMediaType,
    decode_json,
    error_response,
    read_body,
    status_for,
)


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
        # found by benchmarks/fuzz.py (500s on both backends): names that are objects or lists
        (body({"dataframe_split": {"data": [], "columns": [{"": None}, [1, 0.0]]}}), "application/json", "columns"),
        (body({"dataframe_split": {"data": [], "columns": [{"a": None}, [None], {}]}}), "application/json", "names"),
        (body({"dataframe_split": {"data": [[1]], "columns": ["a"], "index": [[0]]}}), "application/json", "index"),
        (body({"dataframe_split": {"data": [[1]], "columns": "a"}}), "application/json", "list of names"),
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


# -- bounded parsing (serving/errors.py): every malformed body is the client's 4xx, never a 500 ----
@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
        (b'{"inputs": ' + b"[" * 70 + b"1" + b"]" * 70 + b"}", "nested too deeply; nodewise takes at most 64"),
        (b'{"inputs": [[1]], "inputs": [[2]]}', "key 'inputs' appears twice in one JSON object"),
        (b'{"inputs": "\xff\xfe"}', "body is not UTF-8"),
        (b'{"inputs": [[1, 2]', "body is not valid JSON"),
    ],
    ids=["5000-deep", "65-deep", "duplicate-key", "not-utf8", "truncated"],
)
def test_malformed_json_is_a_bad_request_naming_the_problem(raw: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        decode_json(raw)


def test_nan_is_taken_as_mlflow_serve_takes_it() -> None:
    assert np.isnan(to_tensor(parse_body(b'{"inputs": [[NaN, 1.0]]}', "application/json"), "float32", (-1, 2))[0, 0])


def test_numbers_outside_the_models_dtype_are_refused() -> None:
    with pytest.raises(BadRequest, match=r"input value 1e\+300 at \[0, 1\] is outside the range of float32"):
        to_tensor(parse_body(b'{"inputs": [[1.0, 1e300]]}', "application/json"), "float32", (-1, 2))
    with pytest.raises(BadRequest, match="outside the range of int8"):
        to_tensor(parse_body(b'{"inputs": [[1, 300]]}', "application/json"), "int8", (-1, 2))


@pytest.mark.parametrize(
    ("length", "sent", "error", "message"),
    [
        ("abc", b"", BadRequest, "Content-Length 'abc' is not a number"),
        ("-5", b"", BadRequest, "Content-Length -5 is negative"),
        ("2000", b"", PayloadTooLarge, "body of 2000 bytes is over the limit of 1000"),
        ("10", b"12345", ClientTimeout, "the body has 5 bytes, fewer than its Content-Length of 10"),
    ],
)
def test_content_length_is_checked(length: str, sent: bytes, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        read_body(io.BytesIO(sent), {"Content-Length": length}, 1000)
    assert status_for(error("x"))[0] in (400, 408, 413)


def test_an_unplanned_error_is_a_500_with_a_request_id_and_no_details() -> None:
    logged = []
    status, body = error_response(KeyError("secret internals"), lambda rid, e: logged.append(rid))
    answer = json.loads(body)
    assert (status, answer["error_code"]) == (500, "INTERNAL_ERROR")
    assert len(logged) == 1
    assert logged[0] in answer["message"]
    assert "secret internals" not in answer["message"]
