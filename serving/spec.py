"""The typed spec a serving process is started with.

``serving/`` owns this spec; ``tasks/`` builds it from a placement plan. It must stay
importable without Prefect or anything else of nodewise's. Beside it, the two constants a
DeepSpeed rank and its launcher (``tasks/mpi/``) share: ``SPEC_ENV`` and ``ERROR_MARK``.
"""

from __future__ import annotations

import os
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    model_validator,
)

Flavor = Literal["pytorch", "python_function"]

HIDDEN = "***"


def redact_uri(uri: str) -> str:
    """``uri`` with the password of its user part hidden (``postgresql://me:***@db/mlflow``): what a
    spec, and so every record and log of it, keeps. A URI without one is returned as it is."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:{HIDDEN}@{host}"))


def resolve_uri(stored: str, variable: str) -> str:
    """The URI a serving process uses: ``stored`` itself, or, where its password is hidden, the whole
    URI from the environment variable ``variable`` (which must name the same server and user)."""
    if urlsplit(stored).password != HIDDEN:
        return stored
    given = os.environ.get(variable, "")
    if given and redact_uri(given) == stored:
        return given
    raise ValueError(
        f"the spec keeps no password for {stored}; start the serving processes with {variable} set to the "
        "whole URI (nodewise's local Ray and mpirun pass it on)"
    )


class ModelServeSpec(BaseModel):
    """What one Ray Serve application serves, and with what resources."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    app_name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    route_prefix: str = Field(pattern=r"^/[A-Za-z0-9_.\-/]*$")
    model_uri: str = Field(description="Pinned URI, models:/NAME/VERSION.")
    model_name: str
    model_version: str
    tracking_uri: str
    registry_uri: str
    flavor: Flavor
    input_dtype: str | None = Field(
        default=None, description="numpy dtype of a tensor input, from the model signature."
    )
    input_shape: tuple[int, ...] | None = Field(
        default=None, description="Tensor input shape from the signature; -1 for any size."
    )
    min_replicas: NonNegativeInt = Field(default=1, description="0: scaled to zero when idle.")
    max_replicas: PositiveInt = 1
    ceiling_reason: str = Field(default="", description="What set max_replicas (a setting, the cores, memory).")
    target_ongoing_requests: PositiveFloat = 2.0
    upscale_delay_s: NonNegativeFloat = 2.0
    downscale_delay_s: NonNegativeFloat = 60.0
    look_back_period_s: PositiveFloat = 12.0
    metrics_push_interval_s: PositiveFloat = Field(
        default=1.0, description="How often each replica sends its load samples to Serve's controller."
    )
    tp_size: PositiveInt = Field(default=1, description="Devices one replica spans (a placement group of them).")
    num_cpus: NonNegativeFloat = 1.0
    num_gpus: NonNegativeFloat = 0.0
    torch_threads: PositiveInt = 1
    max_ongoing_requests: PositiveInt = 32
    max_batch_size: PositiveInt = 32
    batch_wait_timeout_s: NonNegativeFloat = 0.0
    max_request_bytes: PositiveInt = 16 * 1024 * 1024
    max_error_rate: float = Field(
        default=0.5, gt=0.0, le=1.0, description="Share of failed requests at which the watchdog restarts a replica."
    )
    memory_limit_bytes: PositiveInt | None = Field(
        default=None, description="RSS past which the watchdog restarts the replica."
    )
    max_start_attempts: PositiveInt = Field(
        default=3, description="Failed replica starts before Serve marks the deploy failed."
    )
    device: str = "cpu"
    engine: bool = Field(
        default=False,
        description="A transformers text-generation model served through the continuous-batching engine "
        "(serving/llm_app.py: the OpenAI routes, requests batched by decoding step within each replica).",
    )
    max_tokens_in_flight: PositiveInt | None = Field(
        default=None, description="The engine's token budget per replica: the KV cache the plan counted."
    )
    default_new_tokens: PositiveInt = 16
    max_new_tokens: PositiveInt = 256
    request_timeout_s: PositiveFloat = 60.0
    metrics: bool = Field(
        default=True, description="Export /metrics (serving/metrics.py): under the app's route and on a port of its own"
    )
    latency_target_s: PositiveFloat = Field(default=1.0, description="The p99 target that alert rules compare with.")
    metrics_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="The replica's own /metrics port: 0 an ephemeral one (the watchdog finds it); on Kubernetes a "
        "fixed one that the pod declares (a second replica in the pod falls back to an ephemeral one)",
    )

    @model_validator(mode="after")
    def _replica_bounds(self) -> ModelServeSpec:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})")
        return self


LMFlavor = Literal["transformers", "pytorch"]


SPEC_ENV = "NODEWISE_DEEPSPEED_SPEC"  # the spec's JSON, for ranks on hosts without the launcher's files
ERROR_MARK = "nodewise-worker error:"  # starts the one line a rank that cannot start prints; the launcher reports it


class DeepSpeedSpec(BaseModel):
    """What one DeepSpeed tensor-parallel cluster serves: every rank starts with this spec."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    app_name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    model_uri: str = Field(description="Pinned URI, models:/NAME/VERSION.")
    model_name: str
    model_version: str
    tracking_uri: str
    registry_uri: str
    flavor: LMFlavor
    tp_size: PositiveInt = Field(description="Ranks in the job; every rank holds 1/tp_size of the weights.")
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    host: str = Field(default="127.0.0.1", description="Address rank 0's HTTP server binds to.")
    port: int = Field(default=8100, ge=1, le=65535, description="Rank 0's HTTP port (also the heartbeat sink).")
    torch_threads: PositiveInt = 1
    heartbeat_s: PositiveFloat = 1.0
    heartbeat_timeout_s: PositiveFloat = 10.0
    tick_s: PositiveFloat = Field(default=2.0, description="Idle ranks step together this often (liveness).")
    request_timeout_s: PositiveFloat = 60.0
    collective_timeout_s: PositiveFloat = 600.0
    max_request_bytes: PositiveInt = 16 * 1024 * 1024
    max_batch_size: PositiveInt = 32
    default_new_tokens: PositiveInt = 16
    max_new_tokens: PositiveInt = 256
    batching: bool = Field(
        default=True,
        description="Generation through the continuous-batching engine (serving/engine.py); false: one "
        "request at a time, each a whole step (the serial mode benchmarks compare with).",
    )
    max_tokens_in_flight: PositiveInt | None = Field(
        default=None,
        description="Tokens (prompt plus new) the batching engine holds at once: the KV cache the plan "
        "counted. None: max_batch_size sequences of the model's full length.",
    )
    artifact_uri: str | None = Field(
        default=None, description="The version's artifact location; read in place where it is a local folder."
    )
    download_dir: str | None = Field(default=None, description="Where each rank downloads the model's artifacts.")
    metrics: bool = Field(default=True, description="Rank 0 answers GET /metrics (serving/metrics.py).")
    latency_target_s: PositiveFloat = Field(default=1.0, description="The p99 target that alert rules compare with.")

    @model_validator(mode="after")
    def _token_bounds(self) -> DeepSpeedSpec:
        if self.default_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"default_new_tokens ({self.default_new_tokens}) must be <= max_new_tokens ({self.max_new_tokens})"
            )
        return self
