"""What the real ``openai`` client (unchanged) must find on either backend's OpenAI routes."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from testkit import wait_until

PROMPTS = ["hello nodewise", "a", "serving models", "xyz 123", "the quick brown fox", "ok", "tensor", "batch me"]


def client(endpoint: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{endpoint}/v1", api_key="not-used", max_retries=0, timeout=120)


def complete(api: openai.OpenAI, model: str, prompt: str, stream: bool, max_tokens: int = 12) -> tuple[str, str]:
    """(text, finish reason) of one greedy completion, streamed or not."""
    if not stream:
        answer = api.completions.create(model=model, prompt=prompt, max_tokens=max_tokens)
        return answer.choices[0].text, answer.choices[0].finish_reason
    text, reason = "", None
    for chunk in api.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, stream=True):
        text += chunk.choices[0].text
        reason = chunk.choices[0].finish_reason or reason
    return text, reason


def check_models_and_usage(api: openai.OpenAI, model: str) -> None:
    assert [m.id for m in api.models.list()] == [model]
    answer = api.completions.create(model=model, prompt="hello", max_tokens=5)
    assert answer.object == "text_completion"
    assert answer.usage.prompt_tokens == len("hello")  # the demo tokenizer: one token a character
    assert answer.usage.completion_tokens <= 5
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def check_concurrent_equal_alone(api: openai.OpenAI, model: str) -> dict[str, tuple[str, str]]:
    """8 requests at once, half streamed: each gets what its prompt gets served alone."""
    alone = {p: complete(api, model, p, stream=False) for p in PROMPTS}
    jobs = [(p, i % 2 == 0) for i, p in enumerate(PROMPTS)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: complete(api, model, *job), jobs))
    for (prompt, streamed), got in zip(jobs, together, strict=True):
        assert got == alone[prompt], (prompt, streamed)
    return alone


def check_chat(api: openai.OpenAI, model: str) -> None:
    messages = [{"role": "user", "content": "hi"}]
    answer = api.chat.completions.create(model=model, messages=messages, max_tokens=8)
    assert answer.choices[0].message.role == "assistant"
    assert answer.usage.prompt_tokens == len("user: hi | assistant:")  # the model's own chat template
    streamed = api.chat.completions.create(
        model=model, messages=messages, max_tokens=8, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(streamed)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens


def check_sampling_and_stop(api: openai.OpenAI, model: str) -> None:
    sampled = {"model": model, "prompt": "hello", "max_tokens": 10, "temperature": 0.9, "top_p": 0.9, "seed": 5}
    first = api.completions.create(**sampled).choices[0].text
    assert api.completions.create(**sampled).choices[0].text == first
    greedy, _ = complete(api, model, "hello nodewise", stream=False)
    stop = greedy[3:5]
    cut = api.completions.create(model=model, prompt="hello nodewise", max_tokens=12, stop=[stop]).choices[0]
    assert cut.text == greedy[: greedy.find(stop)]
    assert cut.finish_reason == "stop"
    streamed, reason = "", None
    for chunk in api.completions.create(model=model, prompt="hello nodewise", max_tokens=12, stop=[stop], stream=True):
        streamed += chunk.choices[0].text
        reason = chunk.choices[0].finish_reason or reason
    assert (streamed, reason) == (cut.text, "stop")  # nothing of the stop string was sent, then taken back


def check_errors(api: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        api.completions.create(model=model, prompt="x", temperature=-1)
    assert bad.value.status_code == 400
    assert bad.value.body["param"] == "temperature"
    assert "temperature=-1 is out of range" in bad.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="max_tokens=100000 is over"):
        api.completions.create(model=model, prompt="x", max_tokens=100_000)
    with pytest.raises(openai.BadRequestError, match="n=2 is not supported"):
        api.completions.create(model=model, prompt="x", n=2)
    with pytest.raises(openai.NotFoundError, match="is not served here"):
        api.completions.create(model="gpt-4o", prompt="x")


def check_everything(endpoint: str, model: str) -> dict[str, tuple[str, str]]:
    """Every check above against ``endpoint`` (rank 0, or a Serve route); what each of
    ``PROMPTS`` gets alone (greedy, 12 tokens)."""
    api = client(endpoint)
    check_models_and_usage(api, model)
    alone = check_concurrent_equal_alone(api, model)
    check_chat(api, model)
    check_sampling_and_stop(api, model)
    check_errors(api, model)

    def cancelled() -> int:  # both backends' /health count the engine's sequences by how they ended
        return httpx.get(f"{endpoint}/health", timeout=30).json()["engine"].get("cancelled", 0)

    check_a_client_that_leaves_frees_its_slot(endpoint, model, cancelled)
    return alone


def check_a_client_that_leaves_frees_its_slot(endpoint: str, model: str, cancelled: Callable[[], int]) -> None:
    """A streamed request whose client goes after its first chunk is cancelled (counted by the
    server's engine) instead of generating on to its max_tokens."""
    api = client(endpoint)
    # a prompt that runs to its limit when left alone (greedy: the same every time)
    prompt = next(p for p in PROMPTS if complete(api, model, p, stream=False, max_tokens=100)[1] == "length")
    before = cancelled()
    body = {"model": model, "prompt": prompt, "max_tokens": 100, "stream": True}
    with httpx.stream("POST", f"{endpoint}/v1/completions", json=body, timeout=60) as answer:
        assert answer.status_code == 200
        next(line for line in answer.iter_lines() if line.startswith("data: "))  # one chunk, then leave
    wait_until(lambda: cancelled() != before, 30, "the left stream's request cancelled", every_s=0.2)
    assert cancelled() == before + 1


def check_over_budget_waits(api: openai.OpenAI, model: str, budget: int) -> None:
    """Five requests of 120 tokens each (prompt plus max_tokens) against a budget that holds four:
    the fifth waits for room, and all five get what they get alone."""
    prompts = [("abcdefghij" * 2)[i:] + "z" * (20 + i) for i in range(5)]
    assert 4 * 120 <= budget < 5 * 120  # four fit at once, five do not
    alone = [complete(api, model, p, stream=False, max_tokens=80) for p in prompts]
    with ThreadPoolExecutor(5) as pool:
        together = list(pool.map(lambda p: complete(api, model, p, False, 80), prompts))
    assert together == alone


def check_a_tiny_temperature_leaves_its_batch_alone(endpoint: str, model: str) -> None:
    """The fuzzer's case: ``temperature=8.1e-296`` passed validation, made the sampling
    probabilities NaN and failed every request in its batch (500s). Sent at once with healthy greedy
    requests: every answer is a 200, and each is what its prompt gets alone (below 1e-5 is greedy)."""

    def one(prompt: str, temperature: float | None = None) -> str:
        body = {"model": model, "prompt": prompt, "max_tokens": 12}
        if temperature is not None:
            body["temperature"] = temperature
        answer = httpx.post(f"{endpoint}/v1/completions", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        return answer.json()["choices"][0]["text"]

    alone = {p: one(p) for p in PROMPTS[:6]}
    with ThreadPoolExecutor(8) as pool:
        tiny = [pool.submit(one, p, 8.1e-296) for p in PROMPTS[:2]]
        healthy = [pool.submit(one, p) for p in PROMPTS[:6]]
        assert [f.result() for f in healthy] == [alone[p] for p in PROMPTS[:6]]
        assert [f.result() for f in tiny] == [alone[p] for p in PROMPTS[:2]]
