"""The profiler's arithmetic against hand-computed cases."""

import json
import math

import pytest
import torch

from nodewise.core.errors import InvalidModelConfig
from tasks.planning.profiling import MemoryProfile, dtype_bytes, load_config, profile_config, profile_module

GIB = 1024**3


def llama(**overrides: object) -> dict:
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "vocab_size": 1000,
        "max_position_embeddings": 128,
        "tie_word_embeddings": False,
    }
    return {**config, **overrides}


def hand_count_llama(h: int, inter: int, layers: int, heads: int, kv: int, vocab: int) -> int:
    head_dim = h // heads
    attention = h * h * 2 + 2 * h * kv * head_dim  # q, o full; k, v over kv heads
    mlp = 3 * h * inter
    norms = 2 * h
    return vocab * h * 2 + layers * (attention + mlp + norms) + h


def test_parameter_count_with_grouped_query_attention_matches_hand_count() -> None:
    p = profile_config(llama(), dtype="fp32", seq_len=128)
    assert p.param_count == hand_count_llama(256, 512, 2, 8, 2, 1000)
    assert p.weight_bytes == p.param_count * 4


@pytest.mark.parametrize(("dtype", "per_param"), [("fp32", 4), ("bf16", 2), ("float16", 2), ("int8", 1), ("int4", 0.5)])
def test_dtype_override_scales_weights(dtype: str, per_param: float) -> None:
    p = profile_config(llama(), dtype=dtype, seq_len=128)
    assert p.weight_bytes == int(p.param_count * per_param)


def test_kv_cache_formula_with_gqa() -> None:
    # 2 (k and v) x layers x kv_heads x head_dim x bytes x tokens
    p = profile_config(llama(), dtype="bf16", batch_size=3, seq_len=100)
    assert p.kv_cache_bytes == 2 * 2 * 2 * 32 * 2 * 300


def test_kv_heads_shard_under_tensor_parallelism_and_replicate_past_them() -> None:
    p = profile_config(llama(), dtype="bf16", seq_len=100)  # 2 kv heads
    full = p.kv_cache_bytes
    assert p.kv_bytes_per_rank(1) == full
    assert p.kv_bytes_per_rank(2) == full // 2
    assert p.kv_bytes_per_rank(8) == full // 2  # 8 ranks > 2 kv heads: one head each, replicated


def test_per_rank_bytes_shards_weights_and_adds_comm_buffers() -> None:
    p = MemoryProfile(method="analytic", weight_bytes=10 * GIB, activation_bytes=GIB, runtime_bytes=GIB // 2)
    assert p.per_rank_bytes(1) == p.total_bytes == 11 * GIB + GIB // 2
    assert p.per_rank_bytes(4) == math.ceil(10 * GIB / 4) + GIB + GIB // 2 + 64 * 1024**2


def test_measured_larger_than_analytic_wins() -> None:
    p = MemoryProfile(method="analytic+measured", weight_bytes=100, measured_bytes=1000, runtime_bytes=0)
    assert p.total_bytes == 1000
    assert MemoryProfile(method="analytic", weight_bytes=100, measured_bytes=50, runtime_bytes=0).total_bytes == 100


def test_seq_len_defaults_to_max_positions_capped_at_4096() -> None:
    assert profile_config(llama(), dtype="bf16").kv_tokens == 128
    assert profile_config(llama(max_position_embeddings=32768), dtype="bf16").kv_tokens == 4096


def test_encoder_models_have_no_kv_cache() -> None:
    bert = {
        "model_type": "bert",
        "architectures": ["BertModel"],
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "vocab_size": 100,
    }
    assert profile_config(bert).kv_cache_bytes == 0


def test_module_on_meta_counts_tied_weights_once_and_measures_activations() -> None:
    with torch.device("meta"):
        layer = torch.nn.Linear(10, 20)
        model = torch.nn.Sequential(layer, torch.nn.ReLU(), torch.nn.Linear(20, 10))
        model[2].weight = torch.nn.Parameter(layer.weight.T)  # a different tensor: counted
    p = profile_module(model, torch.zeros(4, 10))
    assert p.param_count == 10 * 20 + 20 + 20 * 10 + 10
    assert p.weight_bytes == p.param_count * 4
    assert p.activation_bytes == (4 * 20 + 4 * 20) * 4  # largest live pair: the ReLU's input and output
    tied = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5, bias=False)).to("meta")
    tied[1].weight = tied[0].weight
    assert profile_module(tied).param_count == 15


def test_unknown_dtype_names_the_choices() -> None:
    with pytest.raises(InvalidModelConfig, match=r"unknown dtype 'fp12'; use one of \['bf16'"):
        dtype_bytes("fp12")


def test_malformed_and_wrong_config_files(tmp_path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"model_type": "llama",')
    with pytest.raises(InvalidModelConfig, match=r"bad\.json is not valid JSON \(line 1"):
        load_config(bad)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    with pytest.raises(InvalidModelConfig, match='is not a transformers config: it has no "model_type"'):
        load_config(other)
    with pytest.raises(InvalidModelConfig, match="no config file at"):
        load_config(tmp_path / "missing.json")
    with pytest.raises(InvalidModelConfig, match="transformers does not know model_type 'no-such-arch'"):
        profile_config({"model_type": "no-such-arch"})


def test_attention_scores_are_materialised_on_cpu_only() -> None:
    cpu = profile_config(llama(), dtype="fp32", batch_size=2, seq_len=64, device="cpu")
    gpu = profile_config(llama(), dtype="fp32", batch_size=2, seq_len=64, device="cuda")
    assert cpu.activation_bytes - gpu.activation_bytes == 2 * 2 * 8 * 64 * 64 * 4  # scores + softmax


def test_opaque_pyfunc_holds_a_second_copy_while_loading_on_cpu_only() -> None:
    from tasks.planning.profile_models import analytic_profile

    from .factories import resolved_model

    model = resolved_model(artifact_bytes=100 * 2**20)
    cpu = analytic_profile(model, device="cpu")
    assert (cpu.weight_bytes, cpu.load_copy_bytes, cpu.analytic_bytes) == (100 * 2**20, 100 * 2**20, 200 * 2**20)
    assert cpu.breakdown()["load_copy"] == 100 * 2**20
    gpu = analytic_profile(model, device="cuda")
    assert (gpu.load_copy_bytes, gpu.analytic_bytes) == (0, 100 * 2**20)
