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
