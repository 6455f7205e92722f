"""The protocol defined once (serving/protocol.py, serving/_bodies.py) and the OpenAPI documents
generated from it (serving/openapi.py)."""

from __future__ import annotations

import json
import re

import pytest

from nodewise.demo_models import char_tokenizer
from serving import _bodies as bodies
from serving import engine, openai_api, openapi
from serving.errors import BadRequest
from serving.messages import EndEvent, FinishReason, TokenEvent
from serving.protocol import (
    ChatRequest,
    CompletionRequest,
    GenerateRequest,
    InvalidParameter,
    SamplingError,
    SamplingParams,
    parse_generate,
    validate,
)
from tests.unit.factories import streamed

LIMITS = openai_api.Limits(model="m", default_max_tokens=8, max_new_tokens=64, max_prompts=4, max_positions=128)


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"prompt": "a", "temperature": 101}, "temperature", r"temperature=101 is out of range; use a number from 0"),
        ({"prompt": "a", "temperature": "0.5"}, "temperature", r"temperature='0.5' is out of range"),
        ({"prompt": "a", "temperature": True}, "temperature", r"temperature=True is out of range"),
        ({"prompt": "a", "temperature": float("nan")}, "temperature", r"temperature=nan is out of range"),
        ({"prompt": "a", "top_p": 1.5}, "top_p", r"top_p=1.5 is out of range; use a number in \(0, 1\]"),
        ({"prompt": "a", "top_k": -2}, "top_k", r"top_k=-2 is out of range"),
        ({"prompt": "a", "seed": 2**63}, "seed", r"seed=9223372036854775808 is out of range; use an integer from 0"),
        ({"prompt": "a", "stop": ""}, "stop", r"stop='' is out of range; use up to 4 non-empty strings"),
        ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop", r"stop=\['a', 'b', 'c', 'd', 'e'\] is out of"),
        ({"prompt": "a", "max_tokens": 1.5}, "max_tokens", r"max_tokens=1.5 is out of range; use an integer >= 1"),
        ({"prompt": "a", "stream": 1}, "stream", r"stream=1 is out of range; use true or false"),
        ({"prompt": "a", "stream_options": {"include_usage": "y"}}, "stream_options", r"include_usage"),
        ({"prompt": "a", "n": 3}, "n", r"n=3 is not supported by nodewise; leave it out"),
        ({"prompt": "a", "tools": [{"type": "function"}]}, "tools", r"tools=\[.*\] is not supported"),
        ({"prompt": {"text": "a"}}, "prompt", r"prompt=\{'text': 'a'\} is out of range; use a string"),
        ({"prompt": [1, -1]}, "prompt", r"prompt=\[1, -1\] is out of range"),
        ({"prompt": "a", "model": 5}, "model", r"model=5 is out of range; use the name of the model"),
        ({}, "prompt", r'"prompt" is required'),
    ],
)
def test_a_bad_completion_field_is_a_400_naming_it_and_its_value(body, param, message) -> None:
    with pytest.raises(InvalidParameter, match=message) as caught:
        validate(CompletionRequest, body)
    assert caught.value.param == param
    assert "\n" not in str(caught.value)
    status, raw = openai_api.openai_error(caught.value)
    assert (status, json.loads(raw)["error"]["param"]) == (400, param)


def test_five_stop_strings_are_refused_naming_stop_and_the_documents_say_four() -> None:
    with pytest.raises(InvalidParameter, match=r"^stop=.* use up to 4 non-empty strings") as caught:
        validate(ChatRequest, {"messages": [{"role": "user", "content": "x"}], "stop": list("abcde")})
    assert caught.value.param == "stop"
    doc = openapi.document("t", "1", openapi.scoring_paths(generate=True))
    for name in ("CompletionRequest", "ChatRequest", "GenerateRequest"):
        stop = doc["components"]["schemas"][name]["properties"]["stop"]
        assert [s.get("maxItems") for s in stop["anyOf"] if s.get("type") == "array"] == [4]


def test_chat_content_is_a_string_or_a_list_of_text_parts(tokenizer) -> None:
    parts = [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]
    parsed = validate(ChatRequest, {"messages": [{"role": "user", "content": parts}]})
    assert parsed.messages[0].text == "hi"
    as_string = openai_api.parse_request("chat", {"messages": [{"role": "user", "content": "hi"}]}, LIMITS, tokenizer)
    as_parts = openai_api.parse_request("chat", {"messages": [{"role": "user", "content": parts}]}, LIMITS, tokenizer)
    assert as_parts.prompts == as_string.prompts
    image = [{"type": "image_url", "image_url": {"url": "http://x"}}]
    with pytest.raises(InvalidParameter, match=r"^messages\[0\]=.* is out of range; use a non-empty list") as caught:
        validate(ChatRequest, {"messages": [{"role": "user", "content": image}]})
    assert caught.value.param == "messages"
    with pytest.raises(InvalidParameter, match=r"^messages=\[\] is out of range"):
        validate(ChatRequest, {"messages": []})
    content = openapi.document("t", "1", openapi.openai_paths())["components"]["schemas"]["ChatMessage"]
    kinds = content["properties"]["content"]["anyOf"]
    assert {"type": "string"} in kinds
    assert {"items": {"$ref": "#/components/schemas/TextPart"}, "type": "array"} in kinds


def test_each_request_converts_itself_to_sampling_params_in_one_method() -> None:
    request = validate(CompletionRequest, {"prompt": "a", "temperature": 0.5, "top_k": -1, "stop": "END"})
    params = request.sampling(12)
    assert isinstance(params, engine.SamplingParams)  # the engine runs the protocol's own class
    assert (params.max_tokens, params.temperature, params.top_k, params.stop) == (12, 0.5, 0, ("END",))
    assert params.seed is not None  # drawn once, at parse time: every rank draws alike
    assert request.sampling(12) == params
    assert validate(CompletionRequest, {"prompt": "a"}).sampling(3) == SamplingParams(max_tokens=3)
    with pytest.raises(InvalidParameter, match=r"max_tokens=0 is out of range") as caught:
        request.sampling(0)
    assert caught.value.param == "max_tokens"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_tokens": True}, "max_tokens=True is out of range; use an integer >= 1"),
        ({"temperature": 100.5}, "temperature=100.5 is out of range; use a number from 0 (greedy) to 100"),
        ({"top_p": 0.0}, "top_p=0.0 is out of range; use a number in (0, 1]"),
        ({"top_k": -1}, "top_k=-1 is out of range; use an integer >= 0 (0: off)"),
        ({"seed": -1}, "seed=-1 is out of range; use an integer from 0 to 2**63 - 1"),
        ({"stop": ("a",) * 5}, "stop=['a', 'a', 'a', 'a', 'a'] is out of range; use up to 4 non-empty strings"),
    ],
)
def test_sampling_params_check_themselves_with_the_same_ranges(fields, message) -> None:
    with pytest.raises(SamplingError, match=re.escape(message)):
        SamplingParams(**fields)


def test_generate_takes_text_or_token_ids_and_names_what_is_wrong() -> None:
    text = parse_generate(b'{"prompt": "hi", "max_new_tokens": 4, "temperature": 0.7}')
    assert (text.texts, text.input_ids, text.new_tokens(16, 32)) == (["hi"], None, 4)
    assert text.sampling(4).temperature == 0.7
    ids = parse_generate(b'{"input_ids": [[1, 2], [3]], "stream": false}')
    assert (ids.texts, ids.input_ids, ids.new_tokens(16, 32)) == (None, [[1, 2], [3]], 16)
    for body, message in [
        (b"{}", r"send \{\"prompt\""),
        (b'{"prompt": "a", "input_ids": [[1]]}', r"one of them"),
        (b'{"input_ids": [[]]}', r"input_ids\[0\]=\[\] is out of range; use a non-empty list"),
        (b'{"input_ids": [[1.5]]}', r"input_ids\[0\]=\[1.5\] is out of range"),
        (b'{"prompt": []}', r"prompt=\[\] is out of range"),
        (b'{"prompt": "a", "max_new_tokens": 0}', r"max_new_tokens=0 is out of range; use an integer >= 1"),
        (b'{"prompt": "a", "temperature": -0.1}', r"temperature=-0.1 is out of range"),
        (b"[1]", r"the body must be a JSON object; got list"),
        (b'{"prompt": "a", "prompt": "b"}', r"key 'prompt' appears twice"),
    ]:
        with pytest.raises(BadRequest, match=message):
            parse_generate(body)
    with pytest.raises(InvalidParameter, match=r"max_new_tokens=40 is over this deployment's limit of 32"):
        parse_generate(b'{"prompt": "a", "max_new_tokens": 40}').new_tokens(16, 32)


def test_the_answers_are_what_the_body_models_describe(tokenizer) -> None:
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    ids = tokenizer("ok")["input_ids"]
    for kind, answer, chunk in [
        ("completion", bodies.Completion, bodies.CompletionChunk),
        ("chat", bodies.ChatCompletion, bodies.ChatCompletionChunk),
    ]:
        body = {"prompt": "a"} if kind == "completion" else {"messages": [{"role": "user", "content": "a"}]}
        request = openai_api.parse_request(kind, body, LIMITS, tokenizer)
        answer.model_validate(openai_api.response(request, [(ids, FinishReason.STOP)], decode))
        request.include_usage = True
        events = iter([*(TokenEvent(t) for t in ids), EndEvent(FinishReason.LENGTH)])
        lines = streamed(request, events, decode)
        assert lines[-1] == "data: [DONE]\n\n"
        for line in lines[:-1]:
            chunk.model_validate_json(line.removeprefix("data: "))
    bodies.ModelList.model_validate(openai_api.models("m", 1, 128))
    bodies.OpenAIError.model_validate_json(openai_api.openai_error(BadRequest("x"))[1])


def _refs(value, found):
    if isinstance(value, dict):
        if "$ref" in value:
            found.append(value["$ref"])
        for item in value.values():
            _refs(item, found)
    elif isinstance(value, list):
        for item in value:
            _refs(item, found)
    return found


def _keys(value, names=True):
    """Every key of a document at any depth, but the names under ``properties``."""
    if isinstance(value, dict):
        found = set(value) if names else set()
        return found.union(*(_keys(v, k != "properties") for k, v in value.items()))
    if isinstance(value, list):
        return set().union(*(_keys(v) for v in value))
    return set()


def test_the_keyword_check_sees_a_leaked_keyword() -> None:
    assert "ge" in _keys({"properties": {"ge": {"type": "integer"}, "a": {"items": {"ge": 0}}}})
    assert "ge" not in _keys({"properties": {"ge": {"type": "integer"}}})


def _documents():
    return {
        "scoring": openapi.document("s", "1", openapi.scoring_paths(), "/m"),
        "llm": openapi.document("l", "1", {**openapi.scoring_paths(), **openapi.openai_paths()}, "/m"),
        "rank0": openapi.document("r", "1", openapi.scoring_paths(generate=True)),
        "webhook": openapi.document("w", "1", openapi.webhook_paths()),
    }


@pytest.mark.parametrize("name", ["scoring", "llm", "rank0", "webhook"])
def test_each_generated_document_is_openapi_3_1_and_every_ref_resolves(name) -> None:
    from jsonschema import Draft202012Validator

    doc = _documents()[name]
    assert doc["openapi"] == "3.1.0"
    assert set(doc) == {"openapi", "info", "servers", "paths", "components"}
    for path, operations in doc["paths"].items():
        assert path.startswith("/")
        for method, op in operations.items():
            assert method in {"get", "post"}
            assert op["summary"]
            assert "200" in op["responses"]
            assert all(r["description"] for r in op["responses"].values())
    schemas = doc["components"]["schemas"]
    for ref in _refs(doc, []):
        assert ref.startswith("#/components/schemas/")
        assert ref.rsplit("/", 1)[1] in schemas, ref
    assert not {"ge", "gt", "le", "lt"} & _keys(doc)  # pydantic's names leaked as keywords: no constraint
    for schema in schemas.values():
        Draft202012Validator.check_schema(schema)  # OpenAPI 3.1's schemas are JSON Schema 2020-12


def test_the_fuzz_suite_can_generate_requests_from_the_generated_document() -> None:
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_dict(_documents()["rank0"])
    seen = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(operation.as_strategy())
        def generate(case) -> None:
            seen.append((case.method.upper(), case.path))

        generate()
    assert {("POST", "/generate"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models")} <= set(seen)


@pytest.mark.parametrize(
    ("path", "model"),
    [("/generate", GenerateRequest), ("/v1/completions", CompletionRequest), ("/v1/chat/completions", ChatRequest)],
)
def test_a_request_the_document_allows_is_one_its_model_takes(path, model) -> None:
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    operation = schemathesis.openapi.from_dict(_documents()["rank0"])[path]["POST"]
    refused: list[str] = []

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(operation.as_strategy(generation_mode=schemathesis.GenerationMode.POSITIVE))
    def check(case) -> None:
        try:
            validate(model, case.body)
        except InvalidParameter as e:  # only a rule across fields (prompt or input_ids) may refuse
            if e.param is not None:
                refused.append(f"{case.body!r}: {e}")

    check()
    assert refused == []
