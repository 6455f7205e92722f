"""The multi-node backend under real mpirun (Open MPI) with DeepSpeed on gloo, on this machine.

A tiny Llama registered in MLflow (transformers flavour) is deployed by the flow on a declared
inventory of two "nodes" on this host that are each too small for it: two ranks serve it. Its
logits equal one rank's and the whole model's; bad requests get 400 and leave every rank up;
stopping leaves no process and no shared memory behind; a rank that cannot start is reported.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from nodewise.core.errors import DeployFailed, NodewiseError
from nodewise.core.settings import Settings
from testkit import wait_until
from testkit.lm import deploy_on_two_ranks, rank_pids, register_tiny_llama
from tests.integration.conftest import module_settings


@pytest.fixture(scope="module")
def settings(prefect_harness: None) -> Iterator[Settings]:
    # 4 rows profiled: the plan counts KV for 4 x 128 tokens, the engine's budget
    yield from module_settings(
        deepspeed={"ready_timeout_s": 400, "heartbeat_timeout_s": 5}, serve={"max_batch_size": 4}
    )


@pytest.fixture(scope="module")
def experiment(settings: Settings) -> str:
    """An experiment whose artifacts live in the module's state folder."""
    from mlflow import MlflowClient

    return MlflowClient().create_experiment("deepspeed-tests", artifact_location=settings.state.artifacts.as_uri())


@pytest.fixture(scope="module")
def tiny_llama(settings: Settings, experiment: str) -> str:
    return register_tiny_llama(settings, "deepspeed-tests")


@pytest.fixture(scope="module")
def deployed(settings: Settings, tiny_llama: str) -> object:
    return deploy_on_two_ranks(settings, tiny_llama)


def test_the_flow_places_it_on_two_ranks_and_records_it(settings: Settings, deployed: object) -> None:
    from nodewise.ops.status import deployment_logs, deployment_status

    assert deployed.backend == "deepspeed_mpi"
    assert deployed.spec["tp_size"] == 2
    assert "2 nodes x 1 device(s) = 2 tensor-parallel ranks" in deployed.plan
    [row] = deployment_status(settings)["deployments"]
    assert (row["backend"], row["ranks"], row["health"]) == ("deepspeed_mpi", 2, "healthy")
    version = httpx.get(f"{deployed.endpoint}/version", timeout=5).json()
    assert version == {"model": "tiny-llama", "version": "1", "backend": "deepspeed_mpi", "tp_size": 2}
    health = httpx.get(f"{deployed.endpoint}/health", timeout=5).json()
    assert {r["state"] for r in health["ranks"]} == {"ready"}
    assert len({r["pid"] for r in health["ranks"]}) == 2
    log = deployment_logs(settings, "tiny-llama")
    assert "rank 0/2 ready (openmpi, master 127.0.0.1:" in log
    assert "rank 1/2 ready" in log
    with pytest.raises(NodewiseError, match="no deployment named 'nope'; deployments: tiny-llama"):
        deployment_logs(settings, "nope")


def test_a_pytorch_flavour_hugging_face_module_is_sharded_too(settings: Settings, experiment: str) -> None:
    import mlflow
    import torch

    from nodewise.core.procs import free_port
    from nodewise.demo_models import build_llama
    from serving.spec import DeepSpeedSpec
    from tasks.mpi.health import wait_ready
    from tasks.mpi.launcher import launch, stop_cluster

    model, _ = build_llama(hidden=64, layers=2, heads=4, max_positions=128, seed=2)
    ids = np.asarray([[3, 4, 5, 6, 7, 8]])
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            registered_model_name="tiny-llama-pt",
            serialization_format="pickle",
            pip_requirements=["torch", "transformers"],
        )
    spec = DeepSpeedSpec(
        app_name="tiny-llama-pt",
        model_uri=f"models:/tiny-llama-pt/{info.registered_model_version}",
        model_name="tiny-llama-pt",
        model_version=str(info.registered_model_version),
        tracking_uri=settings.tracking_uri,
        registry_uri=settings.registry_uri,
        flavor="pytorch",
        tp_size=2,
        port=free_port(),
    )
    cluster = launch(spec, ["localhost", "localhost"], 1, settings)
    try:
        wait_ready(cluster, 300)
        got = httpx.post(f"{cluster.endpoint}/invocations", json={"inputs": ids.tolist()}, timeout=60).json()
        generated = httpx.post(
            f"{cluster.endpoint}/generate", json={"input_ids": ids.tolist(), "max_new_tokens": 4}, timeout=60
        )
    finally:
        stop_cluster(settings, "tiny-llama-pt")
    with torch.inference_mode():
        expected = model(torch.as_tensor(ids)).logits.numpy()
        whole = model.generate(torch.as_tensor(ids), max_new_tokens=4, do_sample=False, pad_token_id=2)
    np.testing.assert_allclose(np.asarray(got["predictions"]), expected, rtol=1e-4, atol=1e-5)
    assert generated.json() == {"output_ids": [whole[0, ids.shape[1] :].tolist()]}


@pytest.mark.gpu
def test_ranks_on_cuda_answer_like_the_whole_model_on_cpu(settings: Settings, deployed: object) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from nodewise.core.procs import free_port
    from serving._lm import LanguageModel
    from serving.spec import DeepSpeedSpec
    from tasks.mpi.health import wait_ready
    from tasks.mpi.launcher import launch, stop_cluster

    ranks = 2 if torch.cuda.device_count() >= 2 else 1  # NCCL wants one GPU per rank
    spec = DeepSpeedSpec.model_validate(deployed.spec).model_copy(
        update={
            "app_name": "tiny-llama-cuda",
            "tp_size": ranks,
            "device": "cuda",
            "dtype": "float16",
            "port": free_port(),
        }
    )
    ids = [[5, 17, 33, 60, 2, 9, 44, 71]]
    cluster = launch(spec, ["localhost"] * ranks, 1, settings)
    try:
        wait_ready(cluster, 300)
        got = httpx.post(f"{cluster.endpoint}/invocations", json={"inputs": ids}, timeout=60).json()["predictions"]
    finally:
        stop_cluster(settings, "tiny-llama-cuda")
    cpu = spec.model_copy(update={"tp_size": 1, "device": "cpu", "dtype": "float32"})
    np.testing.assert_allclose(np.asarray(got), LanguageModel.load(cpu).forward(np.asarray(ids)), atol=2e-2)


def test_two_ranks_answer_like_one_rank_and_like_the_whole_model(
    settings: Settings, tiny_llama: str, deployed: object
) -> None:
    from nodewise.core.procs import free_port
    from serving._lm import LanguageModel
    from serving.spec import DeepSpeedSpec
    from tasks.mpi.health import wait_ready
    from tasks.mpi.launcher import launch, stop_cluster

    ids = [[5, 17, 33, 60, 2, 9, 44, 71], [80, 3, 3, 12, 50, 61, 7, 8]]
    tp2 = np.asarray(
        httpx.post(f"{deployed.endpoint}/invocations", json={"inputs": ids}, timeout=60).json()["predictions"]
    )
    one_rank = DeepSpeedSpec.model_validate(deployed.spec).model_copy(
        update={"app_name": "tiny-llama-tp1", "tp_size": 1, "port": free_port()}
    )
    cluster = launch(one_rank, ["localhost"], 1, settings)
    try:
        wait_ready(cluster, 300)
        tp1 = np.asarray(
            httpx.post(f"{cluster.endpoint}/invocations", json={"inputs": ids}, timeout=60).json()["predictions"]
        )
        body = {"prompt": ["hello nodewise", "a"], "max_new_tokens": 6}
        text1 = httpx.post(f"{cluster.endpoint}/generate", json=body, timeout=60).json()
    finally:
        stop_cluster(settings, "tiny-llama-tp1")
    whole = LanguageModel.load(one_rank).forward(np.asarray(ids))
    assert tp2.shape == (2, 8, 98)
    np.testing.assert_allclose(tp2, tp1, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(tp2, whole, rtol=1e-4, atol=1e-5)
    text2 = httpx.post(f"{deployed.endpoint}/generate", json=body, timeout=60).json()
    assert text2 == text1
    assert [t[: len(p)] for t, p in zip(text2["generated_text"], body["prompt"], strict=True)] == body["prompt"]
    # The MLflow protocol with text, as the transformers pyfunc takes it.
    answer = httpx.post(f"{deployed.endpoint}/invocations", json={"inputs": ["hello"]}, timeout=60).json()
    assert answer["predictions"][0].startswith("hello")


def test_concurrent_generations_are_batched_and_each_equals_its_prompt_served_alone(deployed: object) -> None:
    """8 clients at once: their requests join the engine's batch as they arrive (some mid-way
    through others) and every rank decodes them together; each answer is what Hugging Face's
    generate gives that prompt alone on the whole model."""
    from concurrent.futures import ThreadPoolExecutor

    from serving._lm import LanguageModel
    from serving.spec import DeepSpeedSpec

    prompts = [[(7 * i + j) % 90 + 3 for j in range(3 + 2 * i)] for i in range(8)]

    def one(prompt: list[int]) -> list[int]:
        body = {"input_ids": [prompt], "max_new_tokens": 12}
        answer = httpx.post(f"{deployed.endpoint}/generate", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        return answer.json()["output_ids"][0]

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, prompts))
    whole = LanguageModel.load(DeepSpeedSpec.model_validate(deployed.spec).model_copy(update={"tp_size": 1}))
    assert got == whole.generate([np.asarray(p) for p in prompts], 12)  # one prompt at a time


def test_sampling_is_reproducible_by_seed_and_stop_strings_end_the_text(deployed: object) -> None:
    """Every rank draws the same tokens (rank 0 picks a seed when none is given); the same seed
    gives the same tokens again, whatever else is in the batch; a stop string ends the text."""

    def generate(body: dict) -> dict:
        answer = httpx.post(f"{deployed.endpoint}/generate", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        return answer.json()

    sampled = {"input_ids": [[5, 17, 33]], "max_new_tokens": 12, "temperature": 0.8, "top_p": 0.9, "seed": 11}
    first = generate(sampled)["output_ids"][0]
    assert generate(sampled)["output_ids"][0] == first
    assert generate({**sampled, "seed": 12})["output_ids"][0] != first
    # the same seed gives the same tokens at TP=1: the whole model in this process, through the engine
    from serving._lm import LanguageModel
    from serving.engine import SamplingParams
    from serving.spec import DeepSpeedSpec

    whole = LanguageModel.load(DeepSpeedSpec.model_validate(deployed.spec).model_copy(update={"tp_size": 1}))
    engine = whole.engine()
    params = {k: v for k, v in sampled.items() if k not in ("input_ids", "max_new_tokens")}
    seq = engine.add([5, 17, 33], SamplingParams(max_tokens=12, **params))
    while not seq.done:
        engine.step()
    assert seq.tokens == first
    drawn = generate({**sampled, "seed": None})["output_ids"][0]  # a seed drawn by rank 0 for every rank
    assert 1 <= len(drawn) <= 12  # fewer when it samples the end-of-sequence token (id 2)
    greedy = generate({"prompt": "hello nodewise", "max_new_tokens": 12})["generated_text"][0]
    tail = greedy[len("hello nodewise") :]
    stop = tail[3:5]
    assert stop
    cut = generate({"prompt": "hello nodewise", "max_new_tokens": 12, "stop": stop})["generated_text"][0]
    assert cut == "hello nodewise" + tail[: tail.find(stop)]


def test_tokens_stream_as_server_sent_events_and_a_client_that_leaves_frees_its_slot(deployed: object) -> None:
    url = f"{deployed.endpoint}/generate"
    body = {"input_ids": [[5, 17, 33]], "max_new_tokens": 12}
    whole = httpx.post(url, json=body, timeout=120).json()["output_ids"][0]
    data = []
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=120) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        data = [line[len("data: ") :] for line in answer.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    *tokens, last = [json.loads(d) for d in data[:-1]]
    streamed = [t["token_id"] for t in tokens]
    assert streamed == whole[: len(streamed)]  # the end-of-sequence token, if any, is not streamed
    assert last["finish_reason"] in ("length", "stop")
    assert last["usage"] == {"prompt_tokens": 3, "completion_tokens": len(streamed)}
    assert all("text" in t for t in tokens)  # the transformers flavour: each event's new text too

    def cancelled() -> int:
        return httpx.get(f"{deployed.endpoint}/health", timeout=30).json()["engine"].get("cancelled", 0)

    before = cancelled()
    long = {"input_ids": [[5, 17, 33]], "max_new_tokens": 120, "stream": True, "temperature": 1.0, "seed": 3}
    with httpx.stream("POST", url, json=long, timeout=120) as answer:
        next(line for line in answer.iter_lines() if line.startswith("data: "))  # one token, then leave
    wait_until(lambda: cancelled() != before, 30, "the left stream's request cancelled", every_s=0.2)
    assert cancelled() == before + 1
    health = httpx.get(f"{deployed.endpoint}/health", timeout=30).json()
    assert health["ready"], health["problems"]  # every rank still up


def test_the_openai_client_works_against_rank_0(deployed: object) -> None:
    """The unchanged ``openai`` client: models, completions and chat, streamed and not, 8 at once
    each equal to its prompt served alone, sampling and stop strings, errors in OpenAI's shape with
    every rank up, and a client that leaves mid-stream freeing its slot."""
    from tests.integration import openai_checks as check

    endpoint = deployed.endpoint  # type: ignore[attr-defined]
    pids = rank_pids(endpoint)
    alone = check.check_everything(endpoint, "tiny-llama")
    served = httpx.post(f"{endpoint}/generate", json={"prompt": "hello nodewise", "max_new_tokens": 12}, timeout=60)
    assert served.json()["generated_text"][0] == "hello nodewise" + alone["hello nodewise"][0]  # one engine
    assert deployed.spec["max_tokens_in_flight"] == 4 * 128  # the KV cache the plan counted
    check.check_over_budget_waits(check.client(endpoint), "tiny-llama", 4 * 128)
    assert rank_pids(endpoint) == pids


def test_a_request_with_a_tiny_temperature_leaves_its_batch_mates_alone(deployed: object) -> None:
    """The fuzzer's case on rank 0: ``"temperature": 8.1e-296`` (NaN probabilities, then) failed the
    two requests batched with it too. Now it is greedy, and it and its neighbours all get 200 and
    what they get alone, on ``/generate`` and on the OpenAI route alike; every rank stays up."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.integration import openai_checks as check

    endpoint = deployed.endpoint  # type: ignore[attr-defined]
    pids = rank_pids(endpoint)

    def generate(prompt: list[int], **sampling: float) -> list[int]:
        body = {"input_ids": [prompt], "max_new_tokens": 12, **sampling}
        answer = httpx.post(f"{endpoint}/generate", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        return answer.json()["output_ids"][0]

    prompts = [[(5 * i + j) % 90 + 3 for j in range(3 + i)] for i in range(5)]
    alone = [generate(p) for p in prompts]
    with ThreadPoolExecutor(6) as pool:
        tiny = pool.submit(generate, prompts[0], temperature=8.1e-296)
        together = list(pool.map(generate, prompts))
        assert tiny.result() == alone[0]
    assert together == alone
    check.check_a_tiny_temperature_leaves_its_batch_alone(endpoint, "tiny-llama")
    assert rank_pids(endpoint) == pids


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/invocations", b"{not json", 400, "body is not valid JSON"),
        ("/invocations", json.dumps({"inputs": [[1, 2, 500]]}).encode(), 400, "token ids outside 0-97"),
        ("/invocations", json.dumps({"inputs": [list(range(3, 90)) * 2]}).encode(), 400, "over the model's limit"),
        ("/generate", json.dumps({"prompt": "x", "max_new_tokens": 10_000}).encode(), 400, "over this deployment"),
        ("/generate", json.dumps({"prompt": "x", "temperature": -1}).encode(), 400, "temperature=-1 is out of range"),
        ("/generate", json.dumps({"input_ids": [[5]], "top_p": 2}).encode(), 400, "top_p=2 is out of range"),
        (
            "/generate",
            json.dumps({"input_ids": [[5], [6]], "stream": True}).encode(),
            400,
            "a streamed request takes one prompt",
        ),
        ("/invocations", b"a,b\n1,2", 415, "text/plain"),
        ("/nope", b"{}", 404, "no route POST /nope"),
    ],
)
def test_bad_requests_get_a_clear_error_and_every_rank_stays_up(
    deployed: object, path: str, body: bytes, status: int, message: str
) -> None:
    before = rank_pids(deployed.endpoint)
    headers = {"Content-Type": "text/plain" if status == 415 else "application/json"}
    response = httpx.post(f"{deployed.endpoint}{path}", content=body, headers=headers, timeout=30)
    assert response.status_code == status, response.text
    assert message in response.json()["message"]
    assert rank_pids(deployed.endpoint) == before
    ok = httpx.post(f"{deployed.endpoint}/invocations", json={"inputs": [[4, 5, 6]]}, timeout=30)
    assert ok.status_code == 200


def test_fuzzing_rank_0_from_its_openapi_document_gives_no_500_and_every_rank_stays_up(deployed: object) -> None:
    from testkit.fuzzing import fuzz_endpoint

    endpoint = deployed.endpoint  # type: ignore[attr-defined]
    pids = rank_pids(endpoint)
    raw = ("/invocations", "/generate")
    report = fuzz_endpoint(f"{endpoint}/openapi.json", max_examples=15, raw_paths=raw, planned=(503,))
    print(report)
    assert report["server_errors"] == []
    assert report["cases"] > 50
    assert httpx.get(f"{endpoint}/ping", timeout=10).status_code == 200
    assert rank_pids(endpoint) == pids  # no rank restarted or died


def test_a_rank_that_cannot_start_is_reported_and_nothing_is_left(
    settings: Settings, experiment: str, deployed: object
) -> None:
    import mlflow
    import torch

    from nodewise.core.procs import free_port
    from serving.spec import DeepSpeedSpec
    from tasks.mpi.health import wait_ready
    from tasks.mpi.launcher import launch, stop_cluster
    from tasks.mpi.records import read_cluster

    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.pytorch.log_model(
            torch.nn.Sequential(torch.nn.Linear(4, 4)),
            name="model",
            registered_model_name="custom-module",
            serialization_format="pickle",
            pip_requirements=["torch"],
        )
    spec = DeepSpeedSpec.model_validate(deployed.spec).model_copy(
        update={
            "app_name": "custom-module",
            "model_uri": f"models:/custom-module/{info.registered_model_version}",
            "flavor": "pytorch",
            "port": free_port(),
        }
    )
    cluster = launch(spec, ["localhost", "localhost"], 1, settings)
    try:
        with pytest.raises(DeployFailed, match="DeepSpeed AutoTP cannot shard Sequential, a custom torch module"):
            wait_ready(cluster, 300)
    finally:
        stop_cluster(settings, "custom-module")
    assert read_cluster(settings, "custom-module") is None
    assert not psutil.pid_exists(cluster.pid) or psutil.Process(cluster.pid).status() == psutil.STATUS_ZOMBIE


def test_a_new_version_whose_ranks_fail_is_rolled_back(settings: Settings, experiment: str, deployed: object) -> None:
    from mlflow import MlflowClient

    from nodewise.demo_models import build_llama, log_llama
    from tasks.planning.profile_models import profile_with_cache
    from tasks.planning.registry import resolve_model
    from testkit.flows import deploy_model

    model, tokenizer = build_llama(hidden=64, layers=2, heads=4, max_positions=128, seed=1)
    version = log_llama(model, tokenizer, "tiny-llama", experiment)
    profile_with_cache(
        resolve_model(f"models:/tiny-llama/{version}", MlflowClient()),
        batch_size=settings.serve.max_batch_size,
        device="cpu",
    )  # profiled (and planned on two ranks) while its weights were whole
    # Then its weights file is cut short (a bad copy in the store): every rank fails to load it.
    weights = Path(MlflowClient().get_model_version_download_uri("tiny-llama", version).removeprefix("file://"))
    weights = weights / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    # In place (the old group stops first): the front holds while version 1 is relaunched. A group
    # beside the old one is test_front_deepspeed.py's.
    replace = settings.model_copy(update={"deepspeed": settings.deepspeed.model_copy(update={"upgrade": "replace"})})
    rolled_back = r"did not start: .*\(rolled back: version 1 serves again; the front held \d+ requests for [\d.]+ s\)"
    with pytest.raises(DeployFailed, match=rolled_back):
        deploy_model(
            f"models:/tiny-llama/{version}", inventory=str(settings.state_path / "nodes.yaml"), settings=replace
        )
    assert httpx.get(f"{deployed.endpoint}/version", timeout=5).json()["version"] == "1"
    assert len(rank_pids(deployed.endpoint)) == 2


def test_stopping_leaves_no_process_and_no_shared_memory(settings: Settings, deployed: object) -> None:
    from nodewise.ops.status import stop_everything
    from tasks.mpi.records import read_cluster

    cluster = read_cluster(settings, deployed.app_name)
    pids = rank_pids(deployed.endpoint)
    shm = f"deepspeed_allreduce_buffer_{os.getuid()}_{cluster.master_addr}_{cluster.master_port}_"
    assert sorted(p.name for p in Path("/dev/shm").glob(shm + "*")) == [shm + "0", shm + "1"]
    done = stop_everything(settings)
    assert f"stopped DeepSpeed app {deployed.app_name} (4 process(es))" in done  # supervisor, mpirun, 2 ranks
    assert not any(psutil.pid_exists(p) for p in [*pids, cluster.pid])
    assert list(Path("/dev/shm").glob(shm + "*")) == []
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{deployed.endpoint}/ping", timeout=2)
