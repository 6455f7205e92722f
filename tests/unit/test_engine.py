"""The continuous-batching engine against Hugging Face's own generate, on a tiny random Llama."""

from __future__ import annotations

import re

import pytest
import torch

from serving.engine import BudgetError, Engine, SamplingError, SamplingParams


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )  # fmt: skip
    module = LlamaForCausalLM(config).eval()
    module.generation_config.eos_token_id = None
    module.generation_config.pad_token_id = 0
    return module


def alone(model, prompt: list[int], max_tokens: int) -> list[int]:
    """The peer: Hugging Face's generate, one prompt at a time, greedy."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()


def prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [
        torch.randint(3, 128, (int(torch.randint(2, 20, (1,), generator=g)),), generator=g).tolist() for _ in range(n)
    ]


def run(engine: Engine) -> None:
    while engine.has_work():
        engine.step()


def test_a_batch_gives_each_prompt_what_it_gets_alone(model) -> None:
    engine = Engine(model, max_tokens_in_flight=4096)
    cases = [(p, 3 + 2 * i) for i, p in enumerate(prompts(8))]  # different lengths and token counts
    seqs = [engine.add(p, SamplingParams(max_tokens=m)) for p, m in cases]
    run(engine)
    for seq, (prompt, max_tokens) in zip(seqs, cases, strict=True):
        assert seq.finish_reason == "length"
        assert seq.tokens == alone(model, prompt, max_tokens)
    assert engine.steps <= max(m for _, m in cases) + 1  # one decode step serves every sequence


def test_a_request_joining_mid_batch_is_served_as_if_alone(model) -> None:
    engine = Engine(model, max_tokens_in_flight=4096)
    first, second, late = prompts(3)
    running = [engine.add(first, SamplingParams(max_tokens=12)), engine.add(second, SamplingParams(max_tokens=4))]
    for _ in range(2):  # a step prefills newcomers and decodes every row: 3 tokens each by now
        engine.step()
    assert engine.running == 2
    joined = engine.add(late + late, SamplingParams(max_tokens=10))  # longer than the rows it joins
    run(engine)
    assert running[0].tokens == alone(model, first, 12)
    assert running[1].tokens == alone(model, second, 4)
    assert joined.tokens == alone(model, late + late, 10)


def test_what_does_not_fit_the_budget_waits_then_completes(model) -> None:
    engine = Engine(model, max_tokens_in_flight=40)
    a, b, c = prompts(3)
    seqs = [engine.add(p[:10], SamplingParams(max_tokens=10)) for p in (a, b, c)]  # 20 tokens each
    engine.step()
    assert (engine.running, engine.waiting) == (2, 1)
    run(engine)
    assert [s.tokens for s in seqs] == [alone(model, p[:10], 10) for p in (a, b, c)]
    assert seqs[2].first_token_at > seqs[0].finished_at  # it waited for room
    with pytest.raises(BudgetError, match=r"over the 40 this server holds at once; shorten the prompt or lower"):
        engine.add(list(range(3, 33)), SamplingParams(max_tokens=11))


def test_a_cancelled_request_frees_its_slot_at_the_next_step(model) -> None:
    engine = Engine(model, max_tokens_in_flight=40)
    gone = engine.add(prompts(1)[0][:10], SamplingParams(max_tokens=30))
    waiting = engine.add([5, 6, 7], SamplingParams(max_tokens=20))
    engine.step()
    assert engine.waiting == 1
    gone.cancel()
    engine.step()
    assert gone.finish_reason == "cancelled"
    assert engine.running == 1
    run(engine)
    assert waiting.tokens == alone(model, [5, 6, 7], 20)
    events = []
    while not gone.events.empty():
        events.append(gone.events.get())
    assert events[-1] == ("end", "cancelled")


def test_sampling_is_reproducible_by_seed_whatever_else_runs(model) -> None:
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=40, seed=7)
    alone_engine = Engine(model, max_tokens_in_flight=4096)
    solo = alone_engine.add([9, 8, 7], params)
    run(alone_engine)
    busy = Engine(model, max_tokens_in_flight=4096)
    others = [busy.add(p, SamplingParams(max_tokens=8, temperature=1.0)) for p in prompts(4)]
    again = busy.add([9, 8, 7], params)
    run(busy)
    assert again.tokens == solo.tokens
    assert all(s.done for s in others)
    other_seed = Engine(model, max_tokens_in_flight=4096)
    different = other_seed.add([9, 8, 7], SamplingParams(max_tokens=12, temperature=0.9, seed=8))
    run(other_seed)
    assert different.tokens != solo.tokens
    top1 = Engine(model, max_tokens_in_flight=4096)
    one = top1.add([9, 8, 7], SamplingParams(max_tokens=12, temperature=1.5, top_k=1))
    run(top1)
    assert one.tokens == alone(model, [9, 8, 7], 12)  # top_k=1 is greedy


def test_stop_strings_and_end_of_sequence_end_a_request(model) -> None:
    letters = lambda ids: "".join(chr(97 + i % 26) for i in ids)  # noqa: E731 - a stand-in tokenizer
    reference = alone(model, [4, 5, 6], 16)
    text = letters(reference)
    stop = text[5:7]
    engine = Engine(model, max_tokens_in_flight=4096, decode=letters)
    stopped = engine.add([4, 5, 6], SamplingParams(max_tokens=16, stop=(stop,)))
    run(engine)
    assert stopped.finish_reason == "stop"
    assert stopped.text == text[: text.find(stop)]
    eos = reference[9]
    engine = Engine(model, max_tokens_in_flight=4096, eos_token_ids=[eos])
    ended = engine.add([4, 5, 6], SamplingParams(max_tokens=16))
    run(engine)
    assert ended.finish_reason == "stop"
    assert ended.tokens == reference[: reference.index(eos) + 1]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_tokens": 0}, "max_tokens=0 is out of range; use an integer >= 1"),
        ({"temperature": -1}, "temperature=-1 is out of range"),
        ({"top_p": 0}, "top_p=0 is out of range; use a number in (0, 1]"),
        ({"top_k": -2}, "top_k=-2 is out of range"),
        ({"seed": "x"}, "seed='x' is out of range; use an integer"),
        ({"seed": 2**64}, "seed=18446744073709551616 is out of range; use an integer from 0 to 2**63 - 1"),
        ({"seed": -1}, "seed=-1 is out of range"),
        ({"stop": ("",)}, "stop=[''] is out of range"),
    ],
)
def test_bad_sampling_parameters_name_the_value_and_the_range(fields: dict, message: str) -> None:
    with pytest.raises(SamplingError, match=re.escape(message)):
        SamplingParams(**fields)


def test_the_engine_thread_serves_requests_as_they_come(model) -> None:
    engine = Engine(model, max_tokens_in_flight=4096)
    engine.start()
    try:
        seqs = [engine.add(p, SamplingParams(max_tokens=6)) for p in prompts(5)]
        for seq, prompt in zip(seqs, prompts(5), strict=True):
            assert seq.wait(timeout=60).tokens == alone(model, prompt, 6)
    finally:
        engine.stop()
