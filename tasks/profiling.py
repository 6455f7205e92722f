"""How much memory one replica of a model needs.

The spine's estimate is weights-only: the bytes of the model's stored artifacts, plus the
runtime context of one serving process. The analytic/measured profiler refines it.
"""

from __future__ import annotations

from typing import Literal

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, NonNegativeInt

from tasks.registry import ResolvedModel

GIB = 1024**3
# One serving process (torch + MLflow + Ray worker) before the model: ~0.5 GiB RSS on CPU,
# ~0.5 GiB of CUDA context on a GPU (measured; see ../shared/FACTS.md).
RUNTIME_BYTES = GIB // 2


class MemoryProfile(BaseModel):
    """Memory one copy of the model needs, broken down."""

    model_config = ConfigDict(frozen=True)

    method: Literal["weights-only", "analytic", "measured", "analytic+measured"]
    weight_bytes: NonNegativeInt
    kv_cache_bytes: NonNegativeInt = 0
    activation_bytes: NonNegativeInt = 0
    runtime_bytes: NonNegativeInt = RUNTIME_BYTES
    attention_heads: int | None = None
    kv_heads: int | None = None

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes + self.activation_bytes + self.runtime_bytes

    def per_rank_bytes(self, tp: int) -> int:
        """What one of ``tp`` tensor-parallel ranks holds: shards plus its own runtime."""
        if tp <= 1:
            return self.total_bytes
        comm = 64 * 1024**2  # communication buffers per rank
        shard = -(-(self.weight_bytes + self.kv_cache_bytes) // tp)
        return shard + self.activation_bytes + self.runtime_bytes + comm


def estimate_weights_only(model: ResolvedModel) -> MemoryProfile:
    """A weights-only estimate from the size of the model's stored artifacts."""
    return MemoryProfile(method="weights-only", weight_bytes=model.artifact_bytes)


@task(name="profile-model", cache_policy=NO_CACHE)
def profile_model_task(model: ResolvedModel) -> MemoryProfile:
    """Estimate the memory one replica of ``model`` needs."""
    return estimate_weights_only(model)
