"""Models the benchmarks share."""

from __future__ import annotations

from typing import Any


def reference_mlp() -> Any:
    """The issue's reference model: an MLP 784-2048-2048-2048-10 (10M parameters, fp32)."""
    import torch

    return torch.nn.Sequential(
        torch.nn.Linear(784, 2048),
        torch.nn.ReLU(),
        torch.nn.Linear(2048, 2048),
        torch.nn.ReLU(),
        torch.nn.Linear(2048, 2048),
        torch.nn.ReLU(),
        torch.nn.Linear(2048, 10),
    )


def zoo() -> dict[str, tuple[Any, Any]]:
    """The accuracy zoo: name -> (torch module, input batch). No MLflow needed."""
    import numpy as np
    import torch
    import transformers

    torch.manual_seed(0)
    models: dict[str, tuple[Any, Any]] = {}
    models["mlp"] = (reference_mlp(), np.random.rand(32, 784).astype("float32"))
    models["cnn"] = (
        torch.nn.Sequential(
            torch.nn.Conv2d(3, 64, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(64, 128, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(128, 256, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Flatten(),
            torch.nn.Linear(256 * 16 * 16, 512),
            torch.nn.ReLU(),
            torch.nn.Linear(512, 10),
        ),
        np.random.rand(32, 3, 64, 64).astype("float32"),
    )
    llama = transformers.LlamaConfig(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=512,
    )
    models["tiny-llama"] = (
        transformers.LlamaForCausalLM(llama).eval(),
        np.random.randint(0, 32000, (4, 128)).astype("int64"),
    )
    bert = transformers.BertConfig(
        hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048, vocab_size=30522
    )
    models["tiny-bert"] = (transformers.BertModel(bert).eval(), np.random.randint(0, 30522, (8, 128)).astype("int64"))
    return models
