"""Property tests (hypothesis) of the protocol surface: whatever bytes or JSON a client sends, the
parser answers with a value or a ``ProtocolError`` (a 4xx), never anything else (a 500).
The live endpoints are fuzzed in tests/integration/test_fuzz_endpoints.py."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving._protocol import parse_body, to_tensor
from serving.errors import ProtocolError, decode_json

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=40,
)
KEYS = st.sampled_from(["inputs", "instances", "dataframe_split", "dataframe_records", "other"])
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _scored(raw: bytes, content_type: str = "application/json") -> None:
    """Parse ``raw``; a refusal must be a ProtocolError with a message that says what is wrong."""
    refusal = ""
    try:
        to_tensor(parse_body(raw, content_type), "float32", (-1, 4))
    except ProtocolError as e:
        refusal = str(e) or "(empty message)"
    assert refusal != "(empty message)"


@FUZZ
@given(st.binary(max_size=400))
def test_any_bytes_are_a_value_or_a_client_error(raw: bytes) -> None:
    _scored(raw)
    _scored(raw, "text/csv")


@FUZZ
@given(KEYS, JSON)
def test_any_json_under_a_scoring_key_is_a_value_or_a_client_error(key: str, value: object) -> None:
    _scored(json.dumps({key: value}).encode())


@FUZZ
@given(st.integers(min_value=1, max_value=3000), st.sampled_from("[{"))
def test_any_nesting_depth_is_a_value_or_a_client_error(depth: int, bracket: str) -> None:
    opening, closing = ("[", "]") if bracket == "[" else ('{"a":', "}")
    body = (opening * depth + "1" + closing * depth).encode()
    if depth <= 64:
        assert decode_json(body) is not None
    else:
        with pytest.raises(ProtocolError, match="nested too deeply"):
            decode_json(body)
