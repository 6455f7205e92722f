"""The LLM routes (serving/llm_routes.py) against a local engine client on a tiny random Llama."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch

from serving.engine import Engine, SamplingParams
from serving.engine_client import LocalEngineClient
from serving.llm_routes import LLMFront, app
from serving.messages import EndEvent, FinishReason, TokenEvent
from serving.openai_api import Limits


@pytest.fixture(scope="module")
def served():
    from nodewise.demo_models import build_llama

    module, tokenizer = build_llama(hidden=64, layers=2, heads=4, max_positions=128)
    module.generation_config.eos_token_id = None  # every answer runs to max tokens: comparable lengths
    engine = Engine.for_model(module, tokenizer, max_tokens_in_flight=1024, max_batch=8)
    engine.start()
    limits = Limits("tiny", 8, 32, 8, max_positions=128, vocab_size=module.config.vocab_size, tokens_in_flight=1024)
    front = LLMFront(LocalEngineClient(engine), tokenizer, limits, request_timeout_s=60, max_request_bytes=1 << 20)
    yield module, engine, app(front), tokenizer
    engine.stop()


def alone(module, prompt: list[int], new_tokens: int) -> list[int]:
    """The peer: Hugging Face's generate, this prompt alone, greedy."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = module.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()


async def post_all(asgi, bodies: list[tuple[str, dict]]) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=asgi)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
        return list(await asyncio.gather(*(client.post(path, json=body) for path, body in bodies)))


def post(asgi, path: str, body: dict) -> httpx.Response:
    return asyncio.run(post_all(asgi, [(path, body)]))[0]


def sse_events(response: httpx.Response) -> list:
    lines = [line[len("data: ") :] for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]", lines
    return [json.loads(line) for line in lines[:-1]]


def test_generate_gives_each_prompt_what_it_gets_alone(served) -> None:
    module, _, asgi, _ = served
    rows = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    answer = post(asgi, "/generate", {"input_ids": rows, "max_new_tokens": 6})
    assert answer.status_code == 200, answer.text
    assert answer.json()["output_ids"] == [alone(module, row, 6) for row in rows]

    texts = post(asgi, "/generate", {"prompt": ["hello", "abc"], "max_new_tokens": 5}).json()["generated_text"]
    tokenizer = served[3]
    for prompt, text in zip(["hello", "abc"], texts, strict=True):
        continuation = alone(module, tokenizer(prompt)["input_ids"], 5)
        assert text == prompt + tokenizer.decode(continuation, skip_special_tokens=True)


def test_generate_streamed_is_the_same_tokens_then_the_finish_reason(served) -> None:
    module, _, asgi, _ = served
    response = post(asgi, "/generate", {"input_ids": [[5, 6, 7, 8]], "max_new_tokens": 6, "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    assert [e["token_id"] for e in events if "token_id" in e] == alone(module, [5, 6, 7, 8], 6)
    assert events[-1] == {"finish_reason": "length", "usage": {"prompt_tokens": 4, "completion_tokens": 6}}


def test_openai_completions_streamed_and_not_agree(served) -> None:
    _, _, asgi, _ = served
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 6}
    whole = post(asgi, "/v1/completions", body)
    assert whole.status_code == 200, whole.text
    [choice] = whole.json()["choices"]
    assert choice["finish_reason"] == "length"
    assert whole.json()["usage"]["completion_tokens"] == 6
    chunks = sse_events(post(asgi, "/v1/completions", {**body, "stream": True}))
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    chat = post(asgi, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert chat.status_code == 200
    assert chat.json()["choices"][0]["message"]["role"] == "assistant"


def test_a_poisoned_request_among_healthy_concurrent_ones_finishes_alone(served) -> None:
    module, _, asgi, _ = served
    rows = [[5, 6, 7, 8], [9, 10, 11], [12, 13], [14, 15, 16, 17, 18]]
    healthy = [("/generate", {"input_ids": [row], "max_new_tokens": 8}) for row in rows]
    poisoned = ("/generate", {"input_ids": [[20, 21, 22]], "max_new_tokens": 8, "temperature": 8.1e-296})
    answers = asyncio.run(post_all(asgi, [*healthy[:2], poisoned, *healthy[2:]]))
    statuses = [a.status_code for a in answers]
    assert statuses[:2] + statuses[3:] == [200] * 4, [a.text for a in answers]
    got = [a.json()["output_ids"][0] for a in answers[:2] + answers[3:]]
    assert got == [alone(module, row, 8) for row in rows]
    # a temperature this small is greedy: the poisoned one gets its own greedy answer, not a 500
    assert statuses[2] == 200
    assert answers[2].json()["output_ids"] == [alone(module, [20, 21, 22], 8)]


def test_bad_requests_are_400s_in_each_routes_error_shape(served) -> None:
    _, _, asgi, _ = served
    bad = post(asgi, "/generate", {"input_ids": [[5]], "max_new_tokens": 0})
    assert bad.status_code == 400
    assert "max_new_tokens=0" in bad.json()["message"]
    outside = post(asgi, "/generate", {"input_ids": [[5, 10_000]]})
    assert outside.status_code == 400
    assert "outside" in outside.json()["message"]
    openai_bad = post(asgi, "/v1/completions", {"prompt": "hi", "max_tokens": -1})
    assert openai_bad.status_code == 400
    assert openai_bad.json()["error"]["param"] == "max_tokens"


def test_leaving_a_sequence_early_cancels_it_in_the_engine(served) -> None:
    _, engine, _, _ = served
    client = LocalEngineClient(engine)
    before = engine.finished.get("cancelled", 0)

    async def read_two() -> list:
        source = client.generate([5, 6, 7], SamplingParams(max_tokens=30), "leaving")
        seen = [await anext(source), await anext(source)]
        await source.aclose()
        return seen

    seen = asyncio.run(read_two())
    assert all(isinstance(e, TokenEvent) for e in seen)
    key = FinishReason.CANCELLED.value
    assert asyncio.run(asyncio.wait_for(_until(lambda: engine.finished.get(key, 0) > before), 10))
    assert not any(isinstance(e, EndEvent) for e in seen)


async def _until(condition) -> bool:
    while not condition():
        await asyncio.sleep(0.01)
    return True


class StalledEngine:
    """An engine client that takes a request and never answers it (a stand-in: no real engine stalls
    on demand); it records what was cancelled."""

    max_tokens_in_flight = 1024

    def __init__(self) -> None:
        self.cancelled: list[str] = []

    async def generate(self, prompt, params, request_id):
        await asyncio.Event().wait()
        yield  # pragma: no cover

    def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)

    def check_ready(self) -> None:
        pass


def test_a_request_past_its_timeout_is_cancelled_with_a_504_or_a_timeout_event(served) -> None:
    tokenizer = served[3]
    stalled = StalledEngine()
    limits = Limits("tiny", 8, 32, 8, max_positions=128, vocab_size=tokenizer.vocab_size, tokens_in_flight=1024)
    asgi = app(LLMFront(stalled, tokenizer, limits, request_timeout_s=0.3, max_request_bytes=1 << 20))
    whole = post(asgi, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 3})
    assert whole.status_code == 504, whole.text
    assert "no token within" in whole.json()["error"]["message"]
    streamed = post(asgi, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 3, "stream": True})
    assert streamed.status_code == 200
    last = json.loads(streamed.text.strip().split("\n\n")[-1].removeprefix("data: "))
    assert last["error"]["code"] == "timeout"
    assert len(stalled.cancelled) >= 2  # each request left the (stalled) engine
