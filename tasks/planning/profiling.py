"""How much memory one copy of a model needs, without downloading or materialising its weights.

Analytic: the model is built (or unpickled) on PyTorch's ``meta`` device, which gives exact
parameter counts and dtypes and, through a forward pass on meta tensors, activation shapes,
all without allocating a byte of weight memory. A plain transformers config JSON is enough,
so a user can ask whether a 70B model would fit before owning its weights.

Per copy: weights + KV cache (causal LMs) + activation peak + per-process runtime context.
Under tensor parallelism each rank holds a shard of the weights and of the KV heads
(KV heads replicate when tp > kv_heads), plus its own runtime and communication buffers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt

from nodewise.core.errors import InvalidModelConfig

GIB = 1024**3
# One serving process before the model: ~0.5 GiB RSS on CPU (torch + MLflow + a Ray worker),
# ~0.5 GiB of CUDA context on a GPU (../shared/FACTS.md).
RUNTIME_BYTES = GIB // 2
COMM_BYTES = 64 * 1024**2  # all-reduce buffers per tensor-parallel rank
DTYPE_BYTES: dict[str, float] = {
    "fp32": 4,
    "float32": 4,
    "bf16": 2,
    "bfloat16": 2,
    "fp16": 2,
    "float16": 2,
    "int8": 1,
    "fp8": 1,
    "int4": 0.5,
}


class MemoryProfile(BaseModel):
    """Memory one copy of the model needs, broken down, with what the numbers came from."""

    model_config = ConfigDict(frozen=True)

    method: Literal["weights-only", "analytic", "measured", "analytic+measured"]
    param_count: NonNegativeInt = 0
    dtype: str | None = None
    weight_bytes: NonNegativeInt
    kv_cache_bytes: NonNegativeInt = 0
    activation_bytes: NonNegativeInt = 0
    load_copy_bytes: NonNegativeInt = Field(
        default=0, description="A transient copy alive while the model loads (opaque pyfuncs on CPU)."
    )
    runtime_bytes: NonNegativeInt = RUNTIME_BYTES
    measured_bytes: NonNegativeInt | None = None
    attention_heads: int | None = None
    kv_heads: int | None = None
    layers: int | None = None
    head_dim: int | None = None
    kv_tokens: NonNegativeInt = 0
    kv_elem_bytes: float = 0.0
    notes: list[str] = []

    @property
    def analytic_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes + self.activation_bytes + self.load_copy_bytes

    @property
    def total_bytes(self) -> int:
        """What one copy needs: the larger of analytic and measured, plus the runtime context."""
        return max(self.analytic_bytes, self.measured_bytes or 0) + self.runtime_bytes

    def kv_bytes_per_rank(self, tp: int) -> int:
        """KV cache on one of ``tp`` ranks: kv heads shard, and replicate when tp > kv heads."""
        if not self.kv_heads or not self.layers or not self.head_dim:
            return math.ceil(self.kv_cache_bytes / max(tp, 1))
        heads = math.ceil(self.kv_heads / tp)
        return int(2 * self.layers * heads * self.head_dim * self.kv_elem_bytes * self.kv_tokens)

    def per_rank_bytes(self, tp: int) -> int:
        """What one of ``tp`` tensor-parallel ranks holds."""
        if tp <= 1:
            return self.total_bytes
        shard = math.ceil(self.weight_bytes / tp)
        return shard + self.kv_bytes_per_rank(tp) + self.activation_bytes + self.runtime_bytes + COMM_BYTES

    def breakdown(self) -> dict[str, int]:
        return {
            "weights": self.weight_bytes,
            "kv_cache": self.kv_cache_bytes,
            "activations": self.activation_bytes,
            **({"load_copy": self.load_copy_bytes} if self.load_copy_bytes else {}),
            "runtime": self.runtime_bytes,
            **({"measured": self.measured_bytes} if self.measured_bytes is not None else {}),
        }


def dtype_bytes(dtype: str) -> float:
    """Bytes per element of a dtype name (fp32, bf16, fp16, int8, int4, ...)."""
    key = dtype.lower().removeprefix("torch.")
    if key not in DTYPE_BYTES:
        raise InvalidModelConfig(f"unknown dtype {dtype!r}; use one of {sorted(set(DTYPE_BYTES))}")
    return DTYPE_BYTES[key]


def parameter_stats(module: Any) -> tuple[int, int, int, str]:
    """Unique parameters of a (meta) module: count, parameter bytes, buffer bytes, dominant dtype."""
    params = {id(p): p for p in module.parameters()}  # tied weights count once
    buffers = [b for b in module.buffers() if id(b) not in params]
    by_dtype: dict[str, int] = {}
    for tensor in params.values():
        key = str(tensor.dtype).removeprefix("torch.")
        by_dtype[key] = by_dtype.get(key, 0) + tensor.numel() * tensor.element_size()
    count = sum(p.numel() for p in params.values())
    buffer_bytes = sum(b.numel() * b.element_size() for b in buffers)
    dominant = max(by_dtype, key=by_dtype.__getitem__) if by_dtype else "float32"
    return count, sum(by_dtype.values()), buffer_bytes, dominant


def load_config(source: str | Path | dict[str, Any]) -> dict[str, Any]:
    """A transformers config as a dict, from a dict, a JSON file, or a folder holding config.json."""
    if isinstance(source, dict):
        return dict(source)
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise InvalidModelConfig(f"no config file at {path}; pass a transformers config.json") from e
    except json.JSONDecodeError as e:
        raise InvalidModelConfig(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from e
    if not isinstance(data, dict) or "model_type" not in data:
        raise InvalidModelConfig(f'{path} is not a transformers config: it has no "model_type"')
    return data


def build_meta_model(config: dict[str, Any]) -> Any:
    """The model a transformers config describes, on the meta device (no weight memory)."""
    import torch
    import transformers

    values = dict(config)
    model_type = values.pop("model_type")
    architectures = values.pop("architectures", None) or []
    try:
        conf = transformers.AutoConfig.for_model(model_type, **values)
    except (ValueError, KeyError) as e:
        raise InvalidModelConfig(f"transformers does not know model_type {model_type!r} ({e})") from e
    cls = getattr(transformers, architectures[0], None) if architectures else None
    with torch.device("meta"):
        if cls is not None:
            return cls(conf)
        return transformers.AutoModel.from_config(conf)


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    return config.get("text_config") or config


def _causal(config: dict[str, Any]) -> bool:
    archs = config.get("architectures") or []
    return any("CausalLM" in a or "LMHeadModel" in a for a in archs)


def _has_lm_head(config: dict[str, Any]) -> bool:
    """Models that compute vocabulary-sized logits (causal or masked LM heads)."""
    return any("LM" in a for a in config.get("architectures") or [])


def profile_config(
    config: dict[str, Any],
    *,
    dtype: str | None = None,
    batch_size: int = 1,
    seq_len: int | None = None,
    device: str = "cuda",
) -> MemoryProfile:
    """Analytic profile of a transformers model from its config alone.

    ``device`` decides whether attention scores are materialised: on CPU (and with eager
    attention) they are, batch x heads x seq^2; CUDA's SDPA/flash kernels never hold them.
    """
    module = build_meta_model(config)
    count, _, _, _ = parameter_stats(module)
    text = _text_config(config)
    dtype = dtype or text.get("torch_dtype") or text.get("dtype") or "float32"
    elem = dtype_bytes(dtype)
    weight_bytes = int(count * elem)
    hidden = int(text.get("hidden_size") or text.get("n_embd") or 0)
    heads = text.get("num_attention_heads") or text.get("n_head")
    kv_heads = text.get("num_key_value_heads") or heads
    layers = text.get("num_hidden_layers") or text.get("n_layer")
    head_dim = text.get("head_dim") or (hidden // heads if heads else None)
    max_pos = text.get("max_position_embeddings") or text.get("n_positions") or 2048
    seq = seq_len or min(int(max_pos), 4096)
    kv_tokens = batch_size * seq if _causal(config) else 0
    kv = int(2 * layers * kv_heads * head_dim * elem * kv_tokens) if kv_tokens and layers and head_dim else 0
    inter = int(text.get("intermediate_size") or 4 * hidden)
    vocab = int(text.get("vocab_size") or 0)
    # Prefill peak: residual + normed copy + q/k/v/o, the MLP's intermediate pair, attention scores
    # and their softmax (CPU and eager attention materialise them), and fp32 logits for LM heads.
    tokens = batch_size * seq
    eager = device == "cpu" or text.get("_attn_implementation") == "eager"
    scores = 2 * batch_size * int(heads or 0) * seq * seq * elem if eager else 0
    logits = tokens * vocab * 4 if _has_lm_head(config) else 0
    activations = int(tokens * (6 * hidden + 2 * inter) * elem + scores + logits)
    return MemoryProfile(
        method="analytic",
        param_count=count,
        dtype=dtype,
        weight_bytes=weight_bytes,
        kv_cache_bytes=kv,
        activation_bytes=activations,
        attention_heads=heads,
        kv_heads=kv_heads,
        layers=layers,
        head_dim=head_dim,
        kv_tokens=kv_tokens,
        kv_elem_bytes=elem,
    )


def profile_module(module: Any, example: Any = None, *, dtype: str | None = None, device: str = "cpu") -> MemoryProfile:
    """Analytic profile of a torch module already on the meta device, with activations from a
    meta forward pass over ``example`` (shapes only)."""
    count, param_bytes, buffer_bytes, dominant = parameter_stats(module)
    weight_bytes = (int(count * dtype_bytes(dtype)) if dtype else param_bytes) + buffer_bytes
    config = getattr(module, "config", None)
    if hasattr(config, "to_dict") and example is not None and getattr(example, "ndim", 0) == 2:
        # A transformers model: KV cache and activations from its config, for the example's tokens.
        batch, seq = example.shape
        by_config = profile_config(
            {**config.to_dict(), "architectures": [type(module).__name__]},
            dtype=dtype or dominant,
            batch_size=batch,
            seq_len=seq,
            device=device,
        )
        return by_config.model_copy(update={"param_count": count, "weight_bytes": weight_bytes})
    activations = activation_peak(module, example) if example is not None else 0
    return MemoryProfile(
        method="analytic",
        param_count=count,
        dtype=dtype or dominant,
        weight_bytes=weight_bytes,
        activation_bytes=activations,
    )


def activation_peak(module: Any, example: Any) -> int:
    """Peak bytes of live activations in an inference forward pass, from meta shapes.

    While a leaf module runs, its input and its output are alive together; the peak is the
    largest such pair.
    """
    import torch

    peak = 0

    def nbytes(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, tuple | list):
            return sum(nbytes(v) for v in value)
        if isinstance(value, dict):
            return sum(nbytes(v) for v in value.values())
        return 0

    def hook(mod: Any, args: Any, output: Any) -> None:
        nonlocal peak
        peak = max(peak, nbytes(args) + nbytes(output))

    handles = [m.register_forward_hook(hook) for m in module.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            inputs = torch.as_tensor(example).to("meta")
            module(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return peak
