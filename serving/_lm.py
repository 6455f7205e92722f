"""A causal LM on one rank: loaded from the registry, sharded with DeepSpeed AutoTP, run.

Every rank runs the same calls on the same token ids; DeepSpeed's all-reduces inside the
sharded layers make them cooperate. Only rank 0 tokenizes and decodes.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from serving.autotp import HEAD_FIELDS, architecture_refusal, uneven_heads
from serving.spec import DeepSpeedSpec, resolve_uri


class CannotShard(RuntimeError):
    """AutoTP cannot split this model over the ranks."""


class LanguageModel:
    """The (sharded) module and, for the transformers flavour, its tokenizer."""

    def __init__(self, module: Any, tokenizer: Any | None, spec: DeepSpeedSpec) -> None:
        self.module = module
        self.tokenizer = tokenizer
        self.spec = spec
        config = getattr(module, "config", None)
        self.vocab_size: int | None = getattr(config, "vocab_size", None)
        self.max_positions: int | None = getattr(config, "max_position_embeddings", None)
        self.can_generate = hasattr(module, "generate") and config is not None

    # -- loading -------------------------------------------------------------------------
    @classmethod
    def load(cls, spec: DeepSpeedSpec) -> LanguageModel:
        """Load the registered model on the CPU in ``spec.dtype``.

        A transformers model in an artifact store this host sees as files is read in place
        (no MLflow import, no copy); otherwise its artifacts are downloaded from the registry.
        """
        import torch

        torch.set_num_threads(spec.torch_threads)
        dtype = getattr(torch, spec.dtype)
        local = _local_artifacts(spec)
        if spec.flavor == "transformers" and local is not None:
            return cls(*_load_transformers(local, dtype), spec)
        mlflow = _mlflow(spec)
        if spec.flavor == "pytorch":
            module = mlflow.pytorch.load_model(spec.model_uri, map_location="cpu")
            return cls(module.to(dtype).eval(), None, spec)
        # Everything is read into memory, so the download goes once loaded (one folder per rank).
        with tempfile.TemporaryDirectory(prefix="nodewise-lm-", dir=spec.download_dir) as root:
            downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri=spec.model_uri, dst_path=root))
            return cls(*_load_transformers(downloaded, dtype), spec)

    @staticmethod
    def load_tokenizer(spec: DeepSpeedSpec) -> Any | None:
        """The transformers flavour's tokenizer alone (None when the model was logged without one)."""
        from transformers import AutoTokenizer

        local = _local_artifacts(spec)
        if local is not None:
            folder = local / "components" / "tokenizer"
            return AutoTokenizer.from_pretrained(folder) if folder.exists() else None
        mlflow = _mlflow(spec)
        with tempfile.TemporaryDirectory(prefix="nodewise-tok-", dir=spec.download_dir) as root:
            try:
                downloaded = mlflow.artifacts.download_artifacts(
                    artifact_uri=f"{spec.model_uri}/components/tokenizer", dst_path=root
                )
            except Exception:  # no tokenizer component
                return None
            return AutoTokenizer.from_pretrained(downloaded)

    def shard(self, tp_size: int) -> None:
        """Split the weights over ``tp_size`` ranks with DeepSpeed AutoTP (no-op for one rank)."""
        check_shardable(self.module, tp_size)
        if tp_size == 1:
            if self.spec.device == "cuda":
                self.module = self.module.to("cuda")
            return
        import deepspeed
        import torch

        engine = deepspeed.init_inference(
            self.module,
            tensor_parallel={"tp_size": tp_size},
            dtype=getattr(torch, self.spec.dtype),
            replace_with_kernel_inject=False,
        )
        self.module = engine.module

    # -- running -------------------------------------------------------------------------
    def forward(self, ids: np.ndarray) -> np.ndarray:
        """Logits for a batch of token ids, ``[batch, seq, vocab]`` as float32."""
        import torch

        with torch.inference_mode():
            out = self.module(torch.as_tensor(ids, device=self._device()))
        logits = getattr(out, "logits", out)
        return logits.float().cpu().numpy()

    def generate(self, prompts: list[np.ndarray], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuation of each prompt (token ids in, new token ids out)."""
        import torch

        results = []
        with torch.inference_mode():
            for ids in prompts:
                tensor = torch.as_tensor(ids, device=self._device()).reshape(1, -1)
                out = self.module.generate(
                    tensor,
                    attention_mask=torch.ones_like(tensor),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=self._pad_id(),
                )
                results.append(out[0, tensor.shape[1] :].tolist())
        return results

    def engine(self) -> Any:
        """The continuous-batching engine over this (sharded) module; every rank makes the same one.
        Its token budget is the plan's (``spec.max_tokens_in_flight``: the KV cache the plan counted)."""
        from serving.engine import Engine

        return Engine.for_model(
            self.module,
            self.tokenizer,
            max_tokens_in_flight=self.tokens_in_flight,
            max_batch=self.spec.max_batch_size,
            device=self._device(),
        )

    @property
    def tokens_in_flight(self) -> int:
        """Tokens the engine holds at once: the plan's KV-cache count, else ``max_batch_size``
        sequences of the model's full length."""
        return self.spec.max_tokens_in_flight or self.spec.max_batch_size * (self.max_positions or 2048)

    def _device(self) -> str:
        if self.spec.device == "cuda":
            import torch

            return f"cuda:{torch.cuda.current_device()}"
        return "cpu"

    def _pad_id(self) -> int | None:
        config = getattr(self.module, "generation_config", None) or getattr(self.module, "config", None)
        pad = getattr(config, "pad_token_id", None)
        return pad if pad is not None else getattr(config, "eos_token_id", None)


def _local_artifacts(spec: DeepSpeedSpec) -> Path | None:
    uri = spec.artifact_uri or ""
    if uri.startswith("file:"):
        from urllib.parse import unquote, urlparse

        uri = unquote(urlparse(uri).path)
    if uri.startswith("/") and (Path(uri) / "MLmodel").exists():
        return Path(uri)
    return None


def _mlflow(spec: DeepSpeedSpec) -> Any:
    import mlflow

    mlflow.set_tracking_uri(resolve_uri(spec.tracking_uri, "MLFLOW_TRACKING_URI"))
    mlflow.set_registry_uri(resolve_uri(spec.registry_uri, "MLFLOW_REGISTRY_URI"))
    return mlflow


def _load_transformers(local: Path, dtype: Any) -> tuple[Any, Any]:
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"].get("transformers", {})
    binary = local / flavor.get("model_binary", "model")
    model = AutoModelForCausalLM.from_pretrained(binary, dtype=dtype).eval()
    tokenizer_dir = local / "components" / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir.exists() else None
    return model, tokenizer


def check_shardable(module: Any, tp_size: int) -> None:
    """Raise ``CannotShard`` with the reason when AutoTP cannot split ``module`` ``tp_size`` ways."""
    if tp_size == 1:
        return
    config = getattr(module, "config", None)
    model_type = getattr(config, "model_type", None) if config is not None else None
    name = type(module).__name__
    what = f"{name} ({model_type})" if model_type else f"{name}, a custom torch module"
    refused = architecture_refusal(model_type, tp_size, what)
    if refused:
        raise CannotShard(f"{refused}; register a supported architecture, or give the model a node that holds it whole")
    uneven = uneven_heads(tp_size, {field: getattr(config, field, None) for field in HEAD_FIELDS})
    if uneven:
        raise CannotShard(f"{name} has {uneven}; use a rank count that divides it")


def local_shm_files(master_addr: str, master_port: int) -> list[str]:
    """DeepSpeed's shared-memory all-reduce buffers of one job on this host (its ranks' segments)."""
    prefix = f"deepspeed_allreduce_buffer_{os.getuid()}_{master_addr}_{master_port}_"
    shm = Path("/dev/shm")
    return sorted(str(p) for p in shm.glob(prefix + "*")) if shm.exists() else []
