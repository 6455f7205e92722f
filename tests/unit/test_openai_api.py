"""The OpenAI protocol of both backends (serving/openai_api.py): requests checked, answers shaped."""

from __future__ import annotations

import json

import pytest

from nodewise.demo_models import char_tokenizer
from serving import openai_api
from serving.errors import GenerationFailed, NotReady, RequestTimeout, encode_json
from serving.messages import EndEvent, ErrorEvent, FinishReason, TokenEvent
from serving.openai_api import InvalidParameter, Limits, ModelNotFound, TextStream, parse_request
from tests.unit.factories import streamed

LIMITS = Limits(model="m", default_max_tokens=16, max_new_tokens=64, max_prompts=4, max_positions=128, vocab_size=98)


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def decode_with(tokenizer):
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def test_completion_prompts_in_every_form_openai_takes(tokenizer) -> None:
    one = parse_request("completion", {"model": "m", "prompt": "ab"}, LIMITS, tokenizer)
    assert one.prompts == [tokenizer("ab")["input_ids"]]
    assert one.max_tokens == 16
    assert not one.stream
    many = parse_request("completion", {"prompt": ["ab", "c"], "max_tokens": 5}, LIMITS, tokenizer)
    assert len(many.prompts) == 2
    assert many.max_tokens == 5
    ids = parse_request("completion", {"prompt": [5, 6, 7]}, LIMITS, tokenizer)
    assert ids.prompts == [[5, 6, 7]]
    rows = parse_request("completion", {"prompt": [[5, 6], [7]]}, LIMITS, tokenizer)
    assert rows.prompts == [[5, 6], [7]]


def test_chat_goes_through_the_tokenizers_own_template(tokenizer) -> None:
    request = parse_request("chat", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}, LIMITS, tokenizer)
    assert tokenizer.decode(request.prompts[0]) == "user: hi | assistant:"
    # no max_tokens: the answer may run to the deployment's limit, within the context
    assert request.max_tokens == 64
    parts = [{"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}]
    assert parse_request("chat", {"messages": parts}, LIMITS, tokenizer).prompts == request.prompts


def test_a_tokenizer_without_a_chat_template_is_a_clear_400() -> None:
    bare = char_tokenizer()
    bare.chat_template = None
    with pytest.raises(openai_api.BadRequest, match=r"no chat template.*use /v1/completions"):
        parse_request("chat", {"messages": [{"role": "user", "content": "hi"}]}, LIMITS, bare)


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"prompt": "a", "n": 2}, "n", "n=2 is not supported"),
        ({"prompt": "a", "logprobs": 3}, "logprobs", "logprobs=3 is not supported"),
        ({"prompt": "a", "echo": True}, "echo", "echo=True is not supported"),
        ({"prompt": "a", "temperature": -1}, "temperature", "temperature=-1 is out of range"),
        ({"prompt": "a", "top_p": 0}, "top_p", "top_p=0 is out of range"),
        ({"prompt": "a", "seed": "x"}, "seed", "seed='x' is out of range"),
        ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop", "up to 4"),
        ({"prompt": "a", "max_tokens": 0}, "max_tokens", "max_tokens=0 is out of range; use an integer >= 1"),
        ({"prompt": "a", "max_tokens": 65}, "max_tokens", "over this deployment's limit of 64"),
        ({"prompt": "a" * 120, "max_tokens": 20}, "max_tokens", "over the model's context of 128"),
        ({"prompt": [5, 600]}, "prompt", "within 0-97"),
        ({"prompt": ["a", "b"], "stream": True}, "prompt", "one prompt"),
        ({"prompt": "a", "stream": "yes"}, "stream", "true or false"),
        ({"prompt": []}, "prompt", "use a string"),
        ({}, "prompt", "is required"),
    ],
)
def test_a_request_the_engine_cannot_run_names_the_field(tokenizer, body, param, message) -> None:
    with pytest.raises(InvalidParameter, match=message) as caught:
        parse_request("completion", body, LIMITS, tokenizer)
    status, raw = openai_api.openai_error(caught.value)
    error = json.loads(raw)["error"]
    assert status == 400
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert message.split(" ")[0] in error["message"]


def test_another_model_is_a_404_in_openais_shape(tokenizer) -> None:
    with pytest.raises(ModelNotFound) as caught:
        parse_request("completion", {"model": "gpt-4o", "prompt": "a"}, LIMITS, tokenizer)
    status, raw = openai_api.openai_error(caught.value)
    assert status == 404
    assert json.loads(raw)["error"]["code"] == "model_not_found"
    assert "serves 'm'" in json.loads(raw)["error"]["message"]


def test_statuses_keep_their_meaning_and_a_bug_hides_its_text() -> None:
    assert openai_api.openai_error(NotReady("rank 1 down"))[0] == 503
    assert openai_api.openai_error(RequestTimeout("slow"))[0] == 504
    logged = []
    status, raw = openai_api.openai_error(KeyError("secret detail"), lambda rid, e: logged.append(rid))
    assert status == 500
    assert "secret" not in raw.decode()
    assert logged[0] in raw.decode()
    assert json.loads(raw)["error"]["type"] == "server_error"


def test_a_sampled_request_without_a_seed_gets_one_so_ranks_agree(tokenizer) -> None:
    sampled = parse_request("completion", {"prompt": "a", "temperature": 0.8}, LIMITS, tokenizer)
    assert isinstance(sampled.sampling["seed"], int)
    greedy = parse_request("completion", {"prompt": "a"}, LIMITS, tokenizer)
    assert "seed" not in greedy.sampling


def test_streamed_text_holds_back_what_could_begin_a_stop_string(tokenizer) -> None:
    ids = tokenizer("hello ENDxyz")["input_ids"]
    text = TextStream(decode_with(tokenizer), ("END",))
    pieces = [text.add(t) for t in ids]
    assert "".join(pieces) + text.flush() == "hello "
    assert pieces[6] == ""
    assert pieces[7] == ""
    free = TextStream(decode_with(tokenizer), ("END",))
    pieces = [free.add(t) for t in tokenizer("hello ENx")["input_ids"]]
    assert "".join(pieces) + free.flush() == "hello ENx"  # "EN" given out once "x" shows it was no stop


def test_a_stream_is_chunks_then_the_finish_then_usage_then_done(tokenizer) -> None:
    request = parse_request(
        "chat",
        {"messages": [{"role": "user", "content": "hi"}], "stream": True, "stream_options": {"include_usage": True}},
        LIMITS,
        tokenizer,
    )
    ids = tokenizer("ok")["input_ids"]
    events = iter([TokenEvent(ids[0]), TokenEvent(ids[1]), EndEvent(FinishReason.LENGTH)])
    lines = streamed(request, events, decode_with(tokenizer))
    assert lines[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-1]) == "ok"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"] == {
        "prompt_tokens": len(request.prompts[0]),
        "completion_tokens": 2,
        "total_tokens": len(request.prompts[0]) + 2,
    }
    assert all(c["object"] == "chat.completion.chunk" and c["id"].startswith("chatcmpl-") for c in chunks)


def test_a_whole_answer_cuts_at_the_stop_string_and_counts_usage(tokenizer) -> None:
    request = parse_request("completion", {"prompt": ["a", "b"], "stop": "Z"}, LIMITS, tokenizer)
    results = [(tokenizer("xyZw")["input_ids"], FinishReason.STOP), (tokenizer("pq")["input_ids"], FinishReason.LENGTH)]
    body = openai_api.response(request, results, decode_with(tokenizer))
    assert [c["text"] for c in body["choices"]] == ["xy", "pq"]
    assert [c["finish_reason"] for c in body["choices"]] == ["stop", "length"]
    assert body["usage"]["completion_tokens"] == 6
    assert body["object"] == "text_completion"


@pytest.mark.parametrize(
    ("reason", "said"),
    [(FinishReason.STOP, "stop"), (FinishReason.LENGTH, "length"), (FinishReason.CANCELLED, "abort")],
)
def test_a_finish_reason_reaches_the_client_as_the_word_openai_uses(tokenizer, reason, said) -> None:
    """The engine's ``FinishReason`` through ``collect`` and ``response``, and through ``stream``,
    is the same plain string in the JSON a client reads."""
    assert FinishReason(reason.value) is reason  # the enum round-trips from its word
    assert reason.openai == said
    ids = tokenizer("ok")["input_ids"]
    events = [TokenEvent(ids[0]), TokenEvent(ids[1]), EndEvent(reason)]
    whole = parse_request("completion", {"prompt": "hi"}, LIMITS, tokenizer)
    tokens, finish = openai_api.collect(iter(events))
    assert (tokens, finish) == (ids, reason)
    body = json.loads(encode_json(openai_api.response(whole, [(tokens, finish)], decode_with(tokenizer))))
    assert body["choices"][0]["finish_reason"] == said
    assert body["choices"][0]["text"] == "ok"
    chat = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    chat_request = parse_request("chat", chat, LIMITS, tokenizer)
    lines = streamed(chat_request, iter(events), decode_with(tokenizer))
    chunks = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + [said]


def test_a_sequence_the_engine_failed_is_a_500_with_its_reason_in_openais_shape(tokenizer) -> None:
    """The engine's one line on why a sequence failed reaches its client: the status and body of a
    whole answer, or the error event of a stream (a bug elsewhere still hides its text)."""
    reason = "seq-7 failed at token 4: the model's next-token scores hold NaN or +inf; it ended alone"
    failed = [TokenEvent(5), ErrorEvent(reason), EndEvent(FinishReason.ERROR)]
    with pytest.raises(GenerationFailed) as caught:
        openai_api.collect(iter(failed))
    status, raw = openai_api.openai_error(caught.value, lambda rid, e: pytest.fail("nothing to hide"))
    assert status == 500
    assert json.loads(raw)["error"] == {
        "message": reason,
        "type": "server_error",
        "param": None,
        "code": "generation_failed",
    }
    request = parse_request("completion", {"prompt": "hi", "stream": True}, LIMITS, tokenizer)
    lines = streamed(request, iter(failed), decode_with(tokenizer))
    assert json.loads(lines[-1][len("data: ") :])["error"]["message"] == reason
    assert "[DONE]" not in lines[-1]
