"""The continuous-batching engine against Hugging Face's own generate, on a tiny random Llama."""

from __future__ import annotations

import re

import pytest
import torch

from serving.engine import BudgetError, Engine, SamplingError, SamplingParams
from serving.messages import EndEvent, ErrorEvent, FinishReason, TokenEvent


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


def test_a_sequences_events_are_typed_tokens_then_one_end_with_its_reason(model) -> None:
    engine = Engine(model, max_tokens_in_flight=4096)
    seq = engine.add([5, 6, 7], SamplingParams(max_tokens=4))
    run(engine)
    events = list(seq.events.queue)
    assert events == [*(TokenEvent(t) for t in seq.tokens), EndEvent(FinishReason.LENGTH)]
    assert all(type(e.token) is int for e in events[:-1])
    assert seq.finish_reason is FinishReason.LENGTH
    assert engine.finished == {"length": 1}  # /health counts by the plain word
    assert type(next(iter(engine.finished))) is str


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
    assert (engine.waiting, engine.blocked) == (3, 0)  # they only wait for the next step: room is there
    engine.step()
    assert (engine.running, engine.waiting, engine.blocked) == (2, 1, 1)  # the third has no room
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
    assert events[-1] == EndEvent(FinishReason.CANCELLED)


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


class Faulty:
    """Fault injection: the real model, but the rows whose last input token is ``marker`` get
    ``fill`` as their logits (NaN: a model whose numbers overflow on one input), and the next
    forward pass of the kind named in ``fail_next`` ("prefill" or "decode") raises. A test double
    for one row's logits and one pass, around the real forward."""

    def __init__(self, module, marker: int, fill: float = float("nan")) -> None:
        self.module, self.marker, self.fill = module, marker, fill
        self.generation_config = module.generation_config
        self.fail_next: str | None = None

    def __call__(self, *, input_ids, **kwargs):
        kind = "prefill" if "cache" not in kwargs else "decode"
        if self.fail_next == kind:
            self.fail_next = None
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        out = self.module(input_ids=input_ids, **kwargs)
        out.logits[input_ids[:, -1] == self.marker] = self.fill
        return out


def poisoned_cases(model) -> tuple[int, list[tuple[list[int], int]]]:
    """A marker token the healthy prompts never meet, and the healthy (prompt, max_tokens) pairs."""
    marker = alone(model, [9, 8, 7], 8)[2]  # [9, 8, 7] makes it as its third token
    healthy = [(p, 6 + i) for i, p in enumerate(prompts(6))]
    assert all(marker not in [p[-1], *alone(model, p, m)] for p, m in healthy)  # else pick another
    return marker, healthy


def test_a_poisoned_request_fails_alone_and_its_batch_mates_get_what_they_get_alone(model) -> None:
    """Among healthy concurrent requests: one with NaN scores at its first token (prefill), one at
    its fourth (decode, a running row leaves the batch), a sampled one whose scores overflow at
    its temperature, and the fuzzer's temperature=8.1e-296 (greedy now). Each poisoned one ends
    alone with a clear error; every other gets token for token what it gets alone."""
    marker, healthy = poisoned_cases(model)
    engine = Engine(Faulty(model, marker), max_tokens_in_flight=4096)
    seqs = [engine.add(p, SamplingParams(max_tokens=m)) for p, m in healthy[:3]]
    at_prefill = engine.add([4, 5, marker], SamplingParams(max_tokens=8))
    at_decode = engine.add([9, 8, 7], SamplingParams(max_tokens=8))
    tiny = engine.add([9, 8, 6], SamplingParams(max_tokens=8, temperature=8.1e-296))
    seeded = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=5)
    sampled = engine.add([3, 4, 5], seeded)
    engine.step()
    seqs += [engine.add(p, SamplingParams(max_tokens=m)) for p, m in healthy[3:]]  # join mid-way
    run(engine)
    assert [s.tokens for s in seqs] == [alone(model, p, m) for p, m in healthy]
    assert at_prefill.finish_reason == "error"
    assert at_prefill.tokens == []
    assert re.fullmatch(
        rf"{at_prefill.id} failed at token 1: the model's next-token scores hold NaN or \+inf; it ended alone, "
        "the rest of its batch was not affected",
        at_prefill.error,
    )
    assert (at_decode.finish_reason, at_decode.tokens) == ("error", alone(model, [9, 8, 7], 3))
    assert f"{at_decode.id} failed at token 4: the model's next-token scores hold NaN" in at_decode.error
    assert tiny.finish_reason == "length"
    assert tiny.tokens == alone(model, [9, 8, 6], 8)  # below 1e-5 is greedy
    solo = Engine(model, max_tokens_in_flight=4096)
    again = solo.add([3, 4, 5], seeded)
    run(solo)
    assert sampled.tokens == again.tokens  # a sampled batch-mate draws what it draws alone
    events = list(at_decode.events.queue)
    assert events[-2:] == [ErrorEvent(at_decode.error), EndEvent(FinishReason.ERROR)]
    assert engine.finished["error"] == 2
    assert engine._held == 0  # every admitted sequence gave its budget back, the failed ones too


def test_a_sampled_request_whose_probabilities_overflow_fails_alone(model) -> None:
    """Finite scores too steep for the temperature: their probabilities are NaN, which torch's
    multinomial refuses (and asserts on, on a GPU). That sequence ends; a greedy one with the same
    scores takes the top token."""
    marker, healthy = poisoned_cases(model)
    engine = Engine(Faulty(model, marker, fill=3e38), max_tokens_in_flight=4096)
    steep = engine.add([4, 5, marker], SamplingParams(max_tokens=4, temperature=2e-5, seed=1))
    greedy = engine.add([4, 5, marker], SamplingParams(max_tokens=1))
    mates = [engine.add(p, SamplingParams(max_tokens=m)) for p, m in healthy[:2]]
    run(engine)
    assert steep.finish_reason == "error"
    assert "the sampling probabilities are not finite at temperature=2e-05" in steep.error
    assert (greedy.finish_reason, greedy.tokens) == ("length", [0])  # every score equal: the first
    assert [s.tokens for s in mates] == [alone(model, p, m) for p, m in healthy[:2]]
    assert engine._held == 0  # one done at its first token gave its budget back


def test_a_failed_forward_pass_ends_its_sequences_and_the_engine_thread_serves_on(model) -> None:
    """A forward pass that raises cannot be laid on one row. A failed prefill ends the newcomers
    alone (the running rows go on as if alone); a failed decode ends every running row. The
    engine's thread stays up and serves the requests that come later."""
    marker, healthy = poisoned_cases(model)
    faulty = Faulty(model, marker)
    engine = Engine(faulty, max_tokens_in_flight=4096)
    running = [engine.add(p, SamplingParams(max_tokens=m)) for p, m in healthy[:2]]
    engine.step()
    faulty.fail_next = "prefill"
    newcomer = engine.add(healthy[2][0], SamplingParams(max_tokens=4))
    run(engine)
    assert newcomer.finish_reason == "error"
    assert newcomer.error == (
        "the model's forward pass failed (RuntimeError) for the 1 sequence(s) it held, this one among them; "
        "the server goes on serving: retry, or see the server log"
    )
    assert [s.tokens for s in running] == [alone(model, p, m) for p, m in healthy[:2]]
    engine.start()
    try:
        faulty.fail_next = "decode"
        caught = [engine.add(p, SamplingParams(max_tokens=m)) for p, m in healthy[:3]]
        for seq in caught:
            assert seq.wait(timeout=60).finish_reason == "error"
            assert "forward pass failed (RuntimeError) for the 3 sequence(s)" in seq.error
        later = [engine.add(p, SamplingParams(max_tokens=m)) for p, m in healthy[3:]]
        assert [s.wait(timeout=60).tokens for s in later] == [alone(model, p, m) for p, m in healthy[3:]]
        assert engine._thread is not None
        assert engine._thread.is_alive()
        assert engine._held == 0
    finally:
        engine.stop()


def test_every_rank_goes_on_with_rank_0s_tokens_and_failures(model) -> None:
    """Two engines step in lockstep as two ranks do; ``agree`` hands rank 1 rank 0's choices (the
    broadcast the DeepSpeed worker makes). A row poisoned on rank 0 alone fails on both; one
    poisoned on rank 1 alone goes on with rank 0's tokens: the two batches never diverge."""
    marker, healthy = poisoned_cases(model)
    sent: list[torch.Tensor] = []
    rank0 = Engine(Faulty(model, marker), max_tokens_in_flight=4096, agree=lambda t: sent.append(t) or t)
    rank1 = Engine(Faulty(model, marker + 1), max_tokens_in_flight=4096, agree=lambda t: sent.pop(0))
    cases = [*healthy[:2], ([4, 5, marker], 5), ([4, 5, marker + 1], 5)]
    pairs = [tuple(e.add(p, SamplingParams(max_tokens=m)) for e in (rank0, rank1)) for p, m in cases]
    while rank0.has_work():
        rank0.step()
        rank1.step()
        assert [s.tokens for s in rank0._rows] == [s.tokens for s in rank1._rows]
    assert not rank1.has_work()
    assert [(a.tokens, a.finish_reason) for a, _ in pairs] == [(b.tokens, b.finish_reason) for _, b in pairs]
    assert pairs[2][1].error == f"{pairs[2][1].id} failed at token 1 on rank 0"
    assert pairs[3][0].finish_reason == "length"  # rank 1's NaN row: rank 0 answered it, rank 1 followed


@pytest.mark.parametrize(("temperature", "greedy"), [(0, True), (8.1e-296, True), (9.9e-6, True), (1e-5, False)])
def test_a_temperature_below_1e_5_is_greedy(temperature: float, greedy: bool) -> None:
    assert SamplingParams(temperature=temperature).greedy is greedy


def test_rank_0_answers_a_failed_sequence_with_its_reason_and_its_batch_mates_as_usual(model) -> None:
    """DeepSpeed's step (``serving/step_loop._engine_step``) on one rank: the request whose scores
    went NaN gets an ``ErrorEvent`` with the engine's reason and ends with ERROR, the one beside it
    its tokens, and the engine is kept (no fresh one: nothing else in the batch is lost)."""
    import queue

    from serving.deepspeed_worker import ClusterView, Frontend, _engine_step
    from serving.messages import Add, EndEvent, ErrorEvent, FinishReason, TokenEvent
    from serving.spec import DeepSpeedSpec

    marker, healthy = poisoned_cases(model)
    spec = DeepSpeedSpec(
        app_name="lm", model_uri="models:/lm/1", model_name="lm", model_version="1", tracking_uri="sqlite:///x.db",
        registry_uri="sqlite:///x.db", flavor="transformers", tp_size=1,
    )  # fmt: skip
    frontend = Frontend(spec, ClusterView(spec, world_size=1))
    engine = Engine(Faulty(model, marker), max_tokens_in_flight=4096)
    (prompt, max_tokens), sequences = healthy[0], {}
    adds = (Add("r1", tuple(prompt), max_tokens), Add("r2", (4, 5, marker), 6, {"temperature": 8.1e-296}))
    events = {add.request_id: frontend.streams.setdefault(add.request_id, queue.SimpleQueue()) for add in adds}
    while adds or sequences:
        assert _engine_step(engine, None, sequences, adds, (), frontend) is engine
        adds = ()
    seen = {r: [q.get_nowait() for _ in range(q.qsize())] for r, q in events.items()}
    assert [e.token for e in seen["r1"] if isinstance(e, TokenEvent)] == alone(model, prompt, max_tokens)
    assert seen["r1"][-1] == EndEvent(FinishReason.LENGTH)
    assert seen["r2"][-2:] == [
        ErrorEvent("r2 failed at token 1: the model's next-token scores hold NaN or +inf; it ended alone, "
                   "the rest of its batch was not affected"),
        EndEvent(FinishReason.ERROR),
    ]  # fmt: skip
    assert frontend.view.engine["error"] == 1
    assert frontend.streams == {}  # each stream was handed to its sequence


def test_a_full_batch_blocks_what_waits_and_a_freed_slot_unblocks_it(model) -> None:
    engine = Engine(model, max_tokens_in_flight=1000, max_batch=2)
    a, b, c = prompts(3)
    first = engine.add(a[:5], SamplingParams(max_tokens=6))
    engine.add(b[:5], SamplingParams(max_tokens=20))
    engine.add(c[:5], SamplingParams(max_tokens=5))
    engine.step()
    assert (engine.running, engine.blocked) == (2, 1)  # budget to spare, but no slot in the batch
    while first.finish_reason is None:
        engine.step()
    assert engine.blocked == 0  # a slot is free: the next step admits it


def test_a_top_p_below_float32s_range_keeps_the_likeliest_token() -> None:
    """Found by benchmarks/fuzz.py: top_p=5e-324 is 0 in float32, which masked every token (a 500)."""
    from types import SimpleNamespace

    from serving.sampling import sample

    params = SamplingParams(max_tokens=1, temperature=99.0, top_p=5e-324, seed=1)
    seq = SimpleNamespace(params=params, generator=torch.Generator().manual_seed(1))
    logits = torch.tensor([0.5, 3.0, 1.0, -2.0])
    assert {sample(seq, logits) for _ in range(5)} == {1}  # only the likeliest is left to draw


def test_a_step_that_fails_as_a_whole_ends_each_of_its_sequences_with_an_error_and_a_fresh_engine(model) -> None:
    """``_engine_step`` when the step itself raises (not one sequence's scores): every sequence in it
    is told why and ends with ERROR, and the step loop goes on with a fresh engine."""
    import queue

    from serving.deepspeed_worker import ClusterView, Frontend, _engine_step
    from serving.messages import Add, EndEvent, ErrorEvent, FinishReason
    from serving.spec import DeepSpeedSpec

    class Broken(Engine):
        def step(self) -> None:
            raise RuntimeError("out of memory")

    spec = DeepSpeedSpec(
        app_name="lm", model_uri="models:/lm/1", model_name="lm", model_version="1", tracking_uri="sqlite:///x.db",
        registry_uri="sqlite:///x.db", flavor="transformers", tp_size=1,
    )  # fmt: skip
    frontend = Frontend(spec, ClusterView(spec, world_size=1))
    fresh = Engine(model, max_tokens_in_flight=4096)
    owner = type("Model", (), {"engine": lambda self: fresh})()
    adds = (Add("a", (4, 5, 6), 3), Add("b", (7, 8), 3))
    events = {add.request_id: frontend.streams.setdefault(add.request_id, queue.SimpleQueue()) for add in adds}
    sequences: dict = {}
    assert _engine_step(Broken(model, max_tokens_in_flight=4096), owner, sequences, adds, (), frontend) is fresh
    for q in events.values():
        assert [q.get_nowait() for _ in range(q.qsize())] == [
            ErrorEvent("the engine step failed; see rank 0's log"),
            EndEvent(FinishReason.ERROR),
        ]
    assert sequences == {}


GLOO_PEER_GONE = (
    "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [10.0.0.2]:23204. "
    "This is typically caused by a remote worker crashing."
)  # what torch 2.13's gloo raised on rank 0 when rank 1 was SIGKILLed mid all_reduce


def test_a_rank_gone_mid_step_is_raised_for_the_host_not_answered_as_a_failed_forward(model, monkeypatch) -> None:
    """With ``fatal`` (the step loop's ``lost_peer``), a forward pass that fails because another rank
    is gone leaves ``step`` (rank 0 exits, so the front repeats the request on the restarted
    group); any other failure still ends the sequences with an error, the engine serving on."""
    from serving.step_loop import lost_peer

    def gone(*args, **kwargs):
        raise RuntimeError(GLOO_PEER_GONE)

    engine = Engine(model, max_tokens_in_flight=4096)
    engine.fatal = lost_peer
    seq = engine.add([4, 5, 6], SamplingParams(max_tokens=4))
    engine.step()  # prefill: the first token
    monkeypatch.setattr(model, "forward", gone)
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        engine.step()
    assert not seq.done  # nobody was told it failed: the request is repeated, not answered
    monkeypatch.setattr(model, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("out of memory")))
    engine.step()
    assert seq.done
    assert seq.finish_reason is FinishReason.ERROR
