"""The DeepSpeed backend's pieces that need no ranks: health from heartbeats, request validation,
the mpirun command line, AutoTP's limits, the spec from a plan."""

from __future__ import annotations

import json
import os
import pickle
import re
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from nodewise.core.errors import UnsupportedModel
from nodewise.core.settings import Settings
from serving._lm import CannotShard, check_shardable
from serving.deepspeed_worker import ClusterView, Frontend, RankState
from serving.errors import BadRequest
from serving.messages import Add, Cancel, Forward, Generate, Tick
from serving.spec import DeepSpeedSpec
from tasks.mpi.command import mpirun_command
from tasks.mpi.deploy import build_deepspeed_spec
from tasks.planning.inventory import Inventory, Node
from tasks.planning.inventory_sources import inventory_from_yaml
from tasks.planning.placement import plan_placement
from tasks.planning.profiling import MemoryProfile
from tests.unit.factories import resolved_model

GIB = 1024**3


def spec(**fields: object) -> DeepSpeedSpec:
    values: dict = {
        "app_name": "lm",
        "model_uri": "models:/lm/1",
        "model_name": "lm",
        "model_version": "1",
        "tracking_uri": "sqlite:///x.db",
        "registry_uri": "sqlite:///x.db",
        "flavor": "transformers",
        "tp_size": 2,
        "tick_s": 1.0,
        "request_timeout_s": 5.0,
        "heartbeat_timeout_s": 3.0,
    }
    return DeepSpeedSpec(**{**values, **fields})


def beat(rank: int, **fields: object) -> dict:
    state = RankState(rank, "127.0.0.1")
    state.state = "ready"
    return {**state.beat(), **fields}


# -- health from heartbeats ----------------------------------------------------------------------
def test_ready_only_when_every_rank_is_ready_and_alive() -> None:
    view = ClusterView(spec(), world_size=2)
    assert view.health()["problems"] == ["rank 0: no heartbeat yet", "rank 1: no heartbeat yet"]
    view.record(beat(0))
    view.record(beat(1, state="loading"))
    assert view.health()["problems"] == ["rank 1: loading"]
    view.record(beat(1))
    health = view.health()
    assert health["ready"]
    assert health["problems"] == []
    assert [r["rank"] for r in health["ranks"]] == [0, 1]


def test_a_silent_rank_and_a_stuck_rank_are_named() -> None:
    view = ClusterView(spec(), world_size=2)
    view.record(beat(0))
    view.record(beat(1))
    view.beats[1].received = time.monotonic() - 4.0  # past heartbeat_timeout_s=3
    [problem] = view.health()["problems"]
    assert problem.startswith("rank 1 (")
    # The age as measured when health() ran: 4 s and whatever this machine took since.
    silent = re.search(r"no heartbeat for (\d+\.\d) s$", problem)
    assert silent is not None, problem
    assert float(silent.group(1)) >= 4.0
    view.record(beat(1, step_age_s=7.5, steps=41))  # alive, but one step for longer than tick + request timeout
    assert view.health()["problems"] == ["rank 1: stuck in step 42 for 7.5 s"]


def test_a_failed_rank_reports_why_and_foreign_ranks_are_refused() -> None:
    view = ClusterView(spec(), world_size=2)
    view.record(beat(0))
    view.record(beat(1, state="failed", error="CannotShard: no"))
    assert view.health()["problems"] == ["rank 1: failed (CannotShard: no)"]
    with pytest.raises(BadRequest, match="rank 2, outside 0-1"):
        view.record(beat(2))


# -- what rank 0 broadcasts: a typed plan, dispatched on by class -----------------------------------
def test_rank_0s_plan_takes_adds_and_cancels_and_one_piece_of_work_and_survives_the_broadcast() -> None:
    """``_plan`` sorts what the HTTP threads queued by class; the plan pickles (as
    ``broadcast_object_list`` sends it) to equal messages; ``_run`` does its work on a rank."""
    from concurrent.futures import Future

    from serving.deepspeed_worker import _plan, _run

    view = ClusterView(spec(), world_size=1)
    front = Frontend(view.spec, view)
    added, forward, generate = Future(), Future(), Future()
    ids = np.array([[1, 2, 3]])
    queued = [
        (Add("r1", (4, 5), 3, {"temperature": 0.5, "seed": 1}), added),
        (Forward(ids), forward),
        (Cancel("r0"), Future()),
        (Generate([np.array([7, 8])], 2), generate),
    ]
    for item in queued:
        front.commands.put(item)
    held: list = []
    plan, done = _plan(front, held, tick_s=0.01, busy=False)
    assert done is forward
    assert [type(w) for w, _ in held] == [Generate]
    sent = pickle.loads(pickle.dumps(plan))
    assert sent.adds == (Add("r1", (4, 5), 3, {"temperature": 0.5, "seed": 1}),)
    assert sent.cancels == ("r0",)
    assert isinstance(sent.work, Forward)
    assert np.array_equal(sent.work.ids, ids)
    model = SimpleNamespace(forward=lambda x: x * 2, generate=lambda prompts, n: [[n] for _ in prompts])
    assert np.array_equal(_run(model, sent.work), ids * 2)
    plan, done = _plan(front, held, tick_s=0.01, busy=False)
    assert (done, held, plan.adds, plan.cancels) == (generate, [], (), ())
    assert _run(model, pickle.loads(pickle.dumps(plan)).work) == [[2]]
    plan, done = _plan(front, held, tick_s=0.01, busy=False)  # nothing queued: the ranks tick
    assert (done, pickle.loads(pickle.dumps(plan)).work) == (None, Tick())
    assert _run(model, plan.work) is None


# -- request validation on rank 0 (a stand-in for the loaded model: no ranks run here) -------------
@pytest.fixture
def frontend() -> Frontend:
    view = ClusterView(spec(max_batch_size=2, max_new_tokens=8, default_new_tokens=4), world_size=1)
    view.record(beat(0))
    front = Frontend(view.spec, view)
    front.model = SimpleNamespace(tokenizer=None, vocab_size=50, max_positions=16)
    return front


def post(front: Frontend, path: str, raw: bytes, content_type: str = "application/json") -> tuple[int, str]:
    """``raw`` through rank 0's real HTTP app (``Rank0App``, in process): the status and body."""
    import asyncio

    import httpx

    from serving.rank0_http import Rank0App

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=Rank0App(front))
        async with httpx.AsyncClient(transport=transport, base_url="http://rank0") as client:
            return await client.post(path, content=raw, headers={"content-type": content_type})

    response = asyncio.run(call())
    return response.status_code, response.text


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/invocations", {"inputs": [[1, 2, 99]]}, "token ids outside 0-49 (got 1..99)"),
        ("/invocations", {"inputs": [[1.5, 2]]}, "must be integer token ids"),
        ("/invocations", {"inputs": [1, 2]}, "send token ids as [batch, sequence]"),
        ("/invocations", {"inputs": [[1]] * 3}, "3 sequences is over the limit of 2"),
        (
            "/invocations",
            {"inputs": [list(range(17))]},
            "17 tokens (prompt plus new tokens) is over the model's limit of 16",
        ),
        ("/invocations", {"inputs": ["hello"]}, "this model has no tokenizer (pytorch flavour)"),
        ("/generate", {"prompt": "x", "input_ids": [[1]]}, 'send {\\"prompt\\"'),
        (
            "/generate",
            {"input_ids": [[1]], "max_new_tokens": 9},
            "max_new_tokens=9 is over this deployment's limit of 8",
        ),
        ("/generate", {"input_ids": [[1]], "max_new_tokens": 0}, "max_new_tokens=0 is out of range; use an integer"),
        ("/generate", {"input_ids": [[1] * 10], "max_new_tokens": 8}, "18 tokens (prompt plus new tokens)"),
        ("/generate", {"input_ids": []}, "input_ids=[] is out of range; use a non-empty list"),
        ("/generate", {"input_ids": [[1, [2, 3]]]}, "input_ids[0]=[1, [2, 3]] is out of range"),
        ("/generate", {"input_ids": [[[1, 2]]]}, "input_ids[0]=[[1, 2]] is out of range"),
        ("/generate", {"input_ids": [[1]] * 3}, "3 sequences is over the limit of 2 per request"),
        ("/generate", {"input_ids": [[1]], "temperature": 0.5}, "sampling and stop strings need the batching engine"),
        ("/generate", {"input_ids": [[1]], "stream": True}, "streaming needs the batching engine"),
    ],
)
def test_bad_requests_are_refused_before_any_rank_sees_them(
    frontend: Frontend, path: str, body: dict, message: str
) -> None:
    status, text = post(frontend, path, json.dumps(body).encode())
    assert status == 400
    assert message in text
    assert frontend.commands.empty()  # nothing was broadcast


def test_not_ready_is_refused_with_the_reason(frontend: Frontend) -> None:
    frontend.view.record(beat(0, state="loading"))
    status, text = post(frontend, "/invocations", b'{"inputs": [[1, 2]]}')
    assert status == 503
    assert "rank 0: loading" in text
    assert frontend.commands.empty()


# -- AutoTP's limits --------------------------------------------------------------------------------
def test_autotp_limits_are_explained() -> None:
    import torch

    with pytest.raises(CannotShard, match="cannot shard Sequential, a custom torch module over 2 ranks"):
        check_shardable(torch.nn.Sequential(torch.nn.Linear(2, 2)), 2)
    gpt2 = SimpleNamespace(config=SimpleNamespace(model_type="gpt2"))
    with pytest.raises(CannotShard, match=r"SimpleNamespace \(gpt2\).*Llama"):
        check_shardable(gpt2, 2)
    llama = SimpleNamespace(config=SimpleNamespace(model_type="llama", num_attention_heads=6, num_key_value_heads=3))
    with pytest.raises(CannotShard, match="num_key_value_heads=3, which 2 ranks cannot split evenly"):
        check_shardable(llama, 2)
    check_shardable(torch.nn.Linear(2, 2), 1)  # one rank shards nothing


# -- the mpirun command line ------------------------------------------------------------------------
def test_mpirun_command_for_one_machine_and_for_several_hosts() -> None:
    local = mpirun_command("mpirun", "/py", Path("/s.json"), ["localhost", "127.0.0.1"], 1, ["MASTER_ADDR"], [])
    assert local[local.index("-np") + 1] == "2"
    assert local[local.index("--host") + 1] == "localhost:2"
    assert "--oversubscribe" in local
    assert local[-4:] == ["/py", "-m", "serving.deepspeed_worker", "/s.json"]
    assert "LOCAL_SIZE" not in " ".join(local)  # each rank derives it: nothing hand-set
    remote = mpirun_command(
        "mpirun", "/py", Path("/s.json"), ["gpu-a", "gpu-b"], 4, ["MASTER_ADDR"], ["--mca", "x"], "/agent", "ab12"
    )
    assert remote[remote.index("-np") + 1] == "8"
    assert remote[remote.index("--host") + 1] == "gpu-a:4,gpu-b:4"
    assert "--oversubscribe" not in remote
    assert remote[remote.index("--mca") : remote.index("--mca") + 3] == ["--mca", "plm_rsh_agent", "/agent"]
    # remote Open MPI daemons share no hwloc topology segment (it segfaulted them now and then)
    assert remote[remote.index("rtc_hwloc_vmhole") + 1] == "none"
    assert "rtc_hwloc_vmhole" not in local
    assert remote[remote.index("x") - 1 : remote.index("x") + 1] == ["--mca", "x"]
    assert remote[-5:] == ["/py", "-m", "serving.deepspeed_worker", "/s.json", "--launch=ab12"]


def test_spare_nodes_of_the_same_kind_are_planned_as_stand_ins(tmp_path: Path) -> None:
    path = tmp_path / "nodes.yaml"
    path.write_text(
        "nodes:\n"
        "  - {name: a, cpus: 4, host_memory: 2GiB, address: 10.0.0.1}\n"
        "  - {name: b, cpus: 4, host_memory: 2GiB, address: 10.0.0.2}\n"
        "  - {name: c, cpus: 4, host_memory: 2GiB, address: 10.0.0.3}\n"
        "  - {name: d, cpus: 4, host_memory: 1GiB, address: 10.0.0.4}\n"  # too small for a half
    )
    plan = plan_placement(MemoryProfile(method="analytic", weight_bytes=2 * GIB), inventory_from_yaml(path))
    assert (plan.hosts, plan.spare_hosts) == (["10.0.0.1", "10.0.0.2"], ["10.0.0.3"])


# -- plan -> spec ------------------------------------------------------------------------------------
def test_declared_nodes_give_the_plan_its_hosts(tmp_path: Path) -> None:
    path = tmp_path / "nodes.yaml"
    path.write_text(
        "nodes:\n"
        "  - {name: a, cpus: 4, host_memory: 2GiB, address: 10.0.0.1}\n"
        "  - {name: b, cpus: 4, host_memory: 2GiB}\n"
    )
    inventory = inventory_from_yaml(path)
    plan = plan_placement(MemoryProfile(method="analytic", weight_bytes=2 * GIB), inventory)
    assert (plan.backend, plan.hosts, plan.torch_threads) == ("deepspeed_mpi", ["10.0.0.1", "b"], 4)


def test_spec_from_a_multi_node_plan(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "llama", "num_attention_heads": 4}))
    model = resolved_model(
        flavors=["python_function", "transformers"], artifact_uri=tmp_path.as_uri(), name="my lm", version="3"
    )
    inventory = Inventory(
        source="t", nodes=[Node(name=f"n{i}", cpus=2, host_memory_bytes=2 * GIB, address="localhost") for i in (0, 1)]
    )
    plan = plan_placement(MemoryProfile(method="analytic", weight_bytes=2 * GIB, attention_heads=4), inventory)
    settings = Settings(state_dir=tmp_path, deepspeed={"port": 8200, "max_new_tokens": 64})
    built = build_deepspeed_spec(model, plan, settings)
    assert (built.app_name, built.flavor, built.tp_size, built.device, built.dtype) == (
        "my-lm",
        "transformers",
        2,
        "cpu",
        "float32",
    )
    assert (built.host, built.max_new_tokens) == ("127.0.0.1", 64)
    assert built.port != 8200  # the front takes the endpoint's port (8200); rank 0 gets a free one of its own
    alone = Settings(state_dir=tmp_path, deepspeed={"port": 8200, "front": False})
    assert build_deepspeed_spec(model, plan, alone).port == 8200  # no front: rank 0 is the endpoint
    pinned = Settings(state_dir=tmp_path, deepspeed={"port": 8200, "rank0_port": 8301})
    assert build_deepspeed_spec(model, plan, pinned).port == 8301

    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UnsupportedModel, match=r"\(gpt2\) needs 2 tensor-parallel ranks, but DeepSpeed AutoTP"):
        build_deepspeed_spec(model, plan, settings)
    with pytest.raises(UnsupportedModel, match=r"log it with mlflow\.transformers or mlflow\.pytorch"):
        build_deepspeed_spec(resolved_model(), plan, settings)


def test_without_an_input_example_the_probe_token_ids_fit_any_vocabulary(tmp_path: Path) -> None:
    from tasks.mpi.deploy import probe_ids

    (tmp_path / "MLmodel").write_text("flavors:\n  pytorch: {}\n")
    ids = probe_ids(resolved_model(artifact_uri=tmp_path.as_uri()), spec(flavor="pytorch"))
    assert ids.shape == (1, 8)
    assert ids.dtype == np.int64
    assert set(ids.reshape(-1).tolist()) <= {3, 4}


@pytest.mark.parametrize("csv", [b"None", b"\x1a", b"3949782734"])
def test_a_csv_without_rows_is_a_bad_request_not_a_crash(frontend: Frontend, csv: bytes) -> None:
    """Found by the fuzz suite: a header-only CSV gave an empty prompt list, and rank 0 a 500."""
    frontend.model = SimpleNamespace(tokenizer=lambda text: {"input_ids": [1]}, vocab_size=50, max_positions=16)
    status, text = post(frontend, "/invocations", csv, "text/csv")
    assert (status, "no prompts" in text) == (400, True)


# -- rank 0's validation under fuzzing: every request is an answer or a client error ----------------
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=30,
)
_KEY = st.sampled_from(["inputs", "instances", "prompt", "input_ids", "max_new_tokens", "dataframe_records"])


class _Answering(Frontend):
    """Rank 0 whose ranks answer at once (what they compute is not under test here)."""

    async def run(self, work: Forward | Generate) -> tuple[object, float]:
        if isinstance(work, Forward):
            return np.zeros((*work.ids.shape, 3), dtype=np.float32), 1.0
        return [[1, 2] for _ in work.prompts], 1.0


def _answering() -> Frontend:
    view = ClusterView(spec(max_batch_size=2, max_new_tokens=8, default_new_tokens=4), world_size=1)
    view.record(beat(0))
    front = _Answering(view.spec, view)
    tokenizer = SimpleNamespace(decode=lambda ids, skip_special_tokens=True: "x")
    front.model = SimpleNamespace(
        tokenizer=lambda text: {"input_ids": [1] * min(len(text), 5)}, vocab_size=50, max_positions=16
    )
    front.model.tokenizer.decode = tokenizer.decode  # type: ignore[attr-defined]
    return front


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(_KEY, _JSON, max_size=3), st.sampled_from(["/invocations", "/generate"]))
@example({"inputs": float("inf")}, "/invocations")  # was a 500: np.mod of Infinity warned
@example({"input_ids": [[float("nan")]]}, "/generate")
def test_any_request_is_an_answer_or_a_client_error(payload: dict, route: str) -> None:
    status, text = post(_answering(), route, json.dumps(payload).encode())
    assert status in (200, 400)
    assert json.loads(text)


@pytest.mark.parametrize("inputs", [[[1, 2, 3]], [[1, 99]]], ids=["answered", "refused"])
def test_a_body_large_enough_to_be_parsed_off_the_event_loop_is_answered_alike(inputs: list) -> None:
    """Above ``_PARSE_ON_A_THREAD_BYTES`` rank 0 parses ``/invocations`` on a worker thread: the
    answer (or the 400) is the one a small body gets."""
    from serving.rank0_http import _PARSE_ON_A_THREAD_BYTES

    small = json.dumps({"inputs": inputs}).encode()
    large = small[:-1] + b" " * _PARSE_ON_A_THREAD_BYTES + b"}"
    assert post(_answering(), "/invocations", large) == post(_answering(), "/invocations", small)


def test_a_prompt_with_a_lone_surrogate_is_a_bad_request(frontend: Frontend) -> None:
    """Found by benchmarks/fuzz.py: JSON's "\\udb93" reached the tokenizer, which cannot encode it (a 500)."""
    frontend.model = SimpleNamespace(
        tokenizer=lambda text: {"input_ids": list(text.encode())}, vocab_size=50, max_positions=16
    )
    for path, raw in (("/invocations", b'{"inputs": ["ok \\udb93"]}'), ("/generate", b'{"prompt": "\\udcf5"}')):
        status, text = post(frontend, path, raw)
        assert (status, "lone surrogate" in text) == (400, True)


def test_a_generation_over_the_engines_token_budget_is_a_bad_request(frontend: Frontend) -> None:
    frontend.model = SimpleNamespace(
        tokenizer=None, vocab_size=50, max_positions=16, can_generate=True, tokens_in_flight=10
    )
    with pytest.raises(BadRequest, match=r"5 prompt tokens plus max_new_tokens=8 is over the 10 tokens .* at once"):
        frontend.generation(b'{"input_ids": [[1, 2, 3, 4, 5]], "max_new_tokens": 8}')
    assert frontend.commands.empty()  # nothing reached the ranks


def test_a_streamed_prompt_gets_the_same_text_checks_as_any_prompt(frontend: Frontend) -> None:
    frontend.model = SimpleNamespace(
        tokenizer=lambda text: {"input_ids": list(text.encode())},
        vocab_size=50,
        max_positions=16,
        can_generate=True,
        tokens_in_flight=64,
    )
    with pytest.raises(BadRequest, match="lone surrogate"):
        frontend.generation(b'{"prompt": "ok \\udb93", "stream": true}')
    with pytest.raises(BadRequest, match="empty after tokenization"):
        frontend.generation(b'{"prompt": "", "stream": true}')
    with pytest.raises(BadRequest, match="a streamed request takes one prompt"):
        frontend.generation(b'{"prompt": ["a", "b"], "stream": true}')
    assert frontend.commands.empty()  # nothing reached the ranks


_GLOO_PAIR = """
import os, sys, torch, torch.distributed as dist
from serving.step_loop import lost_peer
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[2]}", rank=rank, world_size=2)
tensor, steps = torch.ones(64), 0
try:
    while True:
        dist.all_reduce(tensor)
        steps += 1
        if rank == 1 and steps == 20:
            os.kill(os.getpid(), 9)
except Exception as e:
    print(f"lost_peer={lost_peer(e)} {type(e).__name__}: {e}", flush=True)
"""


def test_the_error_torchs_gloo_raises_when_a_rank_dies_is_known_as_a_lost_peer(tmp_path: Path) -> None:
    """Two real gloo ranks, one SIGKILLed mid all_reduce: what the survivor's collective raises is
    what ``lost_peer`` recognises (so rank 0 exits instead of answering its requests with errors)."""
    import subprocess
    import sys

    from nodewise.core.procs import free_port
    from nodewise.core.runtime import SOURCE_ROOT

    script = tmp_path / "pair.py"
    script.write_text(_GLOO_PAIR)
    port = str(free_port())
    env = {**os.environ, "PYTHONPATH": str(SOURCE_ROOT)}
    ranks = [
        subprocess.Popen([sys.executable, str(script), str(r), port], stdout=subprocess.PIPE, text=True, env=env)
        for r in (0, 1)
    ]
    out, _ = ranks[0].communicate(timeout=120)
    ranks[1].wait(30)
    assert ranks[1].returncode == -9
    assert out.startswith("lost_peer=True RuntimeError"), out
