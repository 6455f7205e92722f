"""A causal LM that fits one node, on real Ray Serve: the batching engine inside the replica.

The flow deploys a tiny Llama (transformers flavour, text-generation) where it fits: one node,
so Ray Serve. Its replica runs ``serving/engine.py`` and answers the OpenAI routes (the real
``openai`` client), while ``/invocations`` still runs the model's MLflow pyfunc. The plan's
KV-cache count is the engine's token budget; a request that does not fit waits and completes.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from nodewise.core.settings import Settings
from testkit.flows import deploy_model
from testkit.lm import register_tiny_llama
from tests.integration import openai_checks as check
from tests.integration.conftest import module_settings

# 4 rows profiled: the plan counts KV for 4 x 128 tokens, and the engine holds no more
ROWS = 4


@pytest.fixture(scope="module")
def settings(prefect_harness: None) -> Iterator[Settings]:
    yield from module_settings(serve={"max_batch_size": ROWS, "replicas": 1, "max_new_tokens": 100})


@pytest.fixture(scope="module")
def deployed(settings: Settings) -> object:
    from mlflow import MlflowClient

    MlflowClient().create_experiment("llm-serve-tests", artifact_location=settings.state.artifacts.as_uri())
    return deploy_model(register_tiny_llama(settings, "llm-serve-tests"), settings=settings)


def test_the_plan_sends_it_to_ray_serve_with_the_engine_and_its_kv_budget(deployed: object) -> None:
    assert deployed.backend == "ray_serve"
    assert deployed.spec["engine"] is True
    assert deployed.spec["max_tokens_in_flight"] == ROWS * 128  # the KV cache the profile counted
    health = httpx.get(f"{deployed.endpoint}/health", timeout=30).json()
    assert health["tokens_in_flight"] == ROWS * 128
    # the MLflow scoring protocol still works: the prompt and its greedy continuation, from the engine
    scored = httpx.post(f"{deployed.endpoint}/invocations", json={"inputs": ["hello", "ok"]}, timeout=60)
    assert scored.status_code == 200, scored.text
    api = check.client(deployed.endpoint)
    expected = [p + check.complete(api, "tiny-llama", p, stream=False, max_tokens=16)[0] for p in ("hello", "ok")]
    assert scored.json()["predictions"] == expected
    bad = httpx.post(f"{deployed.endpoint}/invocations", json={"inputs": [[1, 2]]}, timeout=60)
    assert bad.status_code == 400
    assert "text prompts" in bad.json()["message"]


def test_the_openai_client_works_against_the_replica(deployed: object) -> None:
    import torch

    from testkit.lm import load_whole_llama

    alone = check.check_everything(deployed.endpoint, "tiny-llama")  # type: ignore[attr-defined]
    # alone is what Hugging Face's generate gives the whole model in this process, greedily
    module, tokenizer = load_whole_llama(deployed.spec["model_uri"])
    ids = torch.tensor([tokenizer("hello nodewise")["input_ids"]])
    out = module.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=2)
    assert alone["hello nodewise"][0] == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_generate_is_served_by_the_replica_as_by_rank_0(deployed: object) -> None:
    """``/generate`` (the same routes as rank 0's, serving/llm_routes.py): token ids give what Hugging
    Face's generate gives, text gives the prompt and the OpenAI route's continuation, and a streamed
    one gives the same tokens, then its finish reason and usage."""
    import json

    import torch

    from testkit.lm import load_whole_llama

    url = f"{deployed.endpoint}/generate"  # type: ignore[attr-defined]
    module, tokenizer = load_whole_llama(deployed.spec["model_uri"])  # type: ignore[attr-defined]
    ids = tokenizer("hello nodewise")["input_ids"]
    answer = httpx.post(url, json={"input_ids": [ids], "max_new_tokens": 12}, timeout=60)
    assert answer.status_code == 200, answer.text
    prompt = torch.tensor([ids])
    out = module.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    expected = out[0, len(ids) :].tolist()
    eos = 2
    assert answer.json()["output_ids"][0] == expected[: expected.index(eos) + 1 if eos in expected else None]

    text = httpx.post(url, json={"prompt": ["hello", "ok"], "max_new_tokens": 16}, timeout=60).json()
    api = check.client(deployed.endpoint)  # type: ignore[attr-defined]
    assert text["generated_text"] == [p + check.complete(api, "tiny-llama", p, False, 16)[0] for p in ("hello", "ok")]

    streamed = httpx.post(url, json={"input_ids": [ids], "max_new_tokens": 12, "stream": True}, timeout=60)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    lines = [line.removeprefix("data: ") for line in streamed.text.split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    events = [json.loads(line) for line in lines[:-1]]
    assert [e["token_id"] for e in events if "token_id" in e] == answer.json()["output_ids"][0]
    assert events[-1]["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(answer.json()["output_ids"][0])}
    bad = httpx.post(url, json={"input_ids": [ids], "max_new_tokens": 0}, timeout=60)
    assert bad.status_code == 400
    assert "max_new_tokens=0" in bad.json()["message"]


def test_a_request_with_a_tiny_temperature_leaves_its_batch_mates_alone(deployed: object) -> None:
    """The fuzzer's ``"temperature": 8.1e-296`` among healthy requests to one replica: all 200, each
    what it gets alone (the same engine as DeepSpeed's ranks: below 1e-5 is greedy)."""
    check.check_a_tiny_temperature_leaves_its_batch_alone(deployed.endpoint, "tiny-llama")  # type: ignore[attr-defined]
    health = httpx.get(f"{deployed.endpoint}/health", timeout=30).json()  # type: ignore[attr-defined]
    assert "error" not in health["engine"]  # no sequence ended with an error


def test_requests_over_the_token_budget_wait_then_complete(deployed: object) -> None:
    check.check_over_budget_waits(check.client(deployed.endpoint), "tiny-llama", ROWS * 128)  # type: ignore[attr-defined]
    health = httpx.get(f"{deployed.endpoint}/health", timeout=30).json()  # type: ignore[attr-defined]
    assert health["engine"]["running"] == 0
    assert health["engine"]["waiting"] == 0


def test_fuzzing_the_replica_from_its_openapi_document_gives_no_500(deployed: object) -> None:
    from testkit.fuzzing import fuzz_endpoint

    endpoint = deployed.endpoint  # type: ignore[attr-defined]
    raw = ("/v1/completions", "/v1/chat/completions")
    report = fuzz_endpoint(f"{endpoint}/openapi.json", max_examples=10, raw_paths=raw)
    print(report)
    assert report["server_errors"] == []
    assert report["cases"] > 50
    assert httpx.get(f"{endpoint}/health", timeout=30).json()["ready"]


def test_the_replica_reports_its_engine_load_to_the_autoscaling_policy(deployed: object) -> None:
    """What Serve samples for nodewise's policy (serving/autoscaling.py): idle, nothing; with three
    batches' worth of completions, sequences waiting with no room behind a full batch (the rule's
    signal to add a replica), the running ones within the batch and the budget in use within it."""
    import asyncio
    import json

    from ray import serve

    from serving.autoscaling import BUDGET_USED, IN_FLIGHT, RUNNING, WAITING
    from testkit import LoadClient, wait_until

    loop = asyncio.new_event_loop()  # Serve's handle lives on one event loop: this test's own

    def stats() -> dict[str, float]:
        """What Serve's replica calls for the policy, asked through a Serve handle."""

        async def ask() -> dict[str, float]:
            app = serve.get_app_handle(deployed.app_name)  # type: ignore[attr-defined]
            return await app.options(method_name="record_autoscaling_stats").remote()

        return loop.run_until_complete(ask())

    idle = {IN_FLIGHT: 0.0, WAITING: 0.0, RUNNING: 0.0, BUDGET_USED: 0.0}
    # an earlier test's clients may have left: their sequences end at the engine's next steps
    wait_until(lambda: stats() == idle, 60, "an idle replica", seen=stats)
    body = json.dumps({"model": "tiny-llama", "prompt": "hello", "max_tokens": 64}).encode()
    seen: list[dict[str, float]] = []

    def queued() -> bool:
        seen.append(stats())
        return seen[-1][WAITING] >= 1

    # a steady three batches' worth: each client sends its next completion when one is answered
    with LoadClient(f"{deployed.endpoint}/v1/completions", body, workers=3 * ROWS, timeout_s=120) as load:  # type: ignore[attr-defined]
        wait_until(queued, 60, "sequences waiting behind a full batch", seen=lambda: seen[-1:])
    assert load.failures == []
    assert load.ok >= 1
    busy = seen[-1]
    assert 1 <= busy[RUNNING] <= ROWS
    assert 0 < busy[BUDGET_USED] <= 1
    assert busy[IN_FLIGHT] > ROWS  # more requests inside the replica than its batch: they wait in its engine
    wait_until(lambda: stats() == idle, 60, "an idle replica after the load", seen=stats)
    loop.close()
