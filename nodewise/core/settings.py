"""The one typed settings model of nodewise.

Only this module reads the environment. Everything else receives a ``Settings``
object (or one of its sections) explicitly.

Every field can be set with an environment variable: prefix ``NODEWISE_``, nested
sections joined by ``__``, e.g. ``NODEWISE_MLFLOW__TRACKING_URI=http://mlflow:5000``
or ``NODEWISE_RAY__ADDRESS=10.0.0.5:6379``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from nodewise import __version__
from nodewise.core.state import StateFolder

Fraction = Annotated[float, Field(gt=0.0, le=1.0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MlflowSettings(_Section):
    """Where the model registry lives."""

    tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking/registry URI. Default: SQLite inside the state folder.",
    )
    registry_uri: str | None = Field(default=None, description="Registry URI when it differs from the tracking URI.")
    max_retries: NonNegativeInt = Field(
        default=0,
        description="MLflow's own HTTP retries per call; the resolve task already retries twice.",
    )
    timeout_s: PositiveFloat = Field(default=10.0, description="HTTP timeout per request.")

    @field_validator("tracking_uri", "registry_uri")
    @classmethod
    def _known_scheme(cls, value: str | None) -> str | None:
        if value is None:
            return None
        allowed = ("sqlite:///", "http://", "https://", "file://", "databricks", "postgresql", "mysql")
        if not value.startswith(allowed):
            raise ValueError(
                f"MLflow URI {value!r} has an unknown scheme; use sqlite:///PATH, http(s)://HOST:PORT or file:///PATH"
            )
        return value


class PrefectSettings(_Section):
    """Which Prefect API the flows report to."""

    api_url: str | None = Field(
        default=None,
        description="Prefect API URL (e.g. http://127.0.0.1:4200/api). Default: ephemeral API.",
    )
    ephemeral_startup_timeout_s: PositiveInt = Field(
        default=120,
        description="How long the ephemeral API may take to start. Prefect's 20 s is too short for a first "
        "run on a busy 2-core machine (its database migrations alone take ~16 s).",
    )

    @field_validator("api_url")
    @classmethod
    def _http_api(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(
                f"Prefect API URL {value!r} must start with http:// or https://, e.g. http://127.0.0.1:4200/api"
            )
        return value


class RaySettings(_Section):
    """The Ray cluster that Ray Serve runs on."""

    address: str | None = Field(
        default=None,
        description="Address of an existing Ray cluster (HOST:PORT). Default: a local instance "
        "bound to 127.0.0.1, started on demand and stopped by `nodewise down`.",
    )
    num_cpus: PositiveInt | None = Field(
        default=None, description="CPUs the local instance offers. Default: all of this machine's."
    )
    port: PositiveInt = Field(
        default=6390,
        ge=1024,
        le=65530,
        description="GCS port of the local instance; it also uses the next three ports.",
    )
    include_dashboard: bool = Field(
        default=False, description="Start Ray's dashboard with the local instance (costs ~300 MB)."
    )
    object_store_memory_bytes: PositiveInt = Field(
        default=512 * 1024**2,
        ge=78643200,
        description="Object store size of the local instance (Ray's minimum is 75 MiB).",
    )
    start_timeout_s: PositiveFloat = Field(
        default=90.0, description="How long starting the local instance (`ray start`) may take."
    )
    max_added_nodes: NonNegativeInt = Field(
        default=0,
        description="Node autoscaling of the local instance: how many worker nodes Ray's own autoscaler may "
        "add when the replicas Serve wants do not fit the running nodes (it removes them after "
        "idle_node_timeout_s). The nodes are Ray nodes on this machine (Ray's fake multi-node provider, "
        "the one its autoscaler tests use). 0: the local instance never grows.",
    )
    added_node_cpus: PositiveInt = Field(default=1, description="CPUs each node the autoscaler adds offers.")
    idle_node_timeout_s: PositiveFloat = Field(
        default=60.0, description="How long an added node stays idle before the autoscaler removes it."
    )
    local_only: bool = Field(
        default=True,
        description="The local instance listens on 127.0.0.1 only: no other machine can join it or reach "
        "its ports (Ray's own switch, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and HAProxy's stats and metrics "
        "pages moved to Serve's host). False: it listens on this machine's address, so that other nodes "
        "can join it with `ray start --address`.",
    )

    @field_validator("address")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is None or value == "auto":
            return value
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"Ray address {value!r} must be HOST:PORT, e.g. 10.0.0.5:6379")
        return value


class ServeSettings(_Section):
    """Defaults for Ray Serve deployments; the placement plan may override them."""

    host: str = Field(default="127.0.0.1", description="Address Serve's HTTP proxy binds to.")
    port: PositiveInt = Field(
        default=8000, le=65535, description="Serve's HTTP port (every model's route prefix is on it)."
    )
    replicas: PositiveInt | None = Field(
        default=None,
        description="A fixed number of replicas (no autoscaling) when set. Default: autoscale between "
        "min_replicas and max_replicas.",
    )
    min_replicas: NonNegativeInt = Field(
        default=1,
        description="Autoscaling floor. 0 (opt-in, per model with the tag nodewise.serve.min_replicas=0): "
        "an idle model releases all its replicas; the next request waits for one to start "
        "(up to cold_start_timeout_s). A deploy still starts one replica, to prove the model loads.",
    )
    max_replicas: PositiveInt = Field(
        default=4,
        description="Autoscaling ceiling; the plan caps it at what the inventory holds (memory, devices, "
        "and on CPU nodes one core per replica: a replica under load keeps a core busy, and more "
        "replicas than cores only take cores from busy ones).",
    )
    target_ongoing_requests: PositiveFloat = Field(
        default=2.0,
        description="Autoscaling target: requests in flight inside each replica. Measured (benchmarks/README.md): "
        "one replica's core is already busy at 1 in flight, and 8 closed-loop clients put only about 3 "
        "inside it (the rest are in the ingress and the client), where a second replica serves 1.2-1.3x "
        "more; 4 never asked for it. LLM replicas scale on their engine instead (waiting sequences, "
        "token budget in use).",
    )
    upscale_delay_s: Annotated[float, Field(ge=0.0)] = Field(
        default=2.0,
        description="Autoscaling: how long the load stays above the target before Serve adds a replica. "
        "Longer than the replicas' sampling interval (a tenth of look_back_period_s), so that a spike "
        "seen in one sample adds nothing (serving/autoscaling.py).",
    )
    downscale_delay_s: Annotated[float, Field(ge=0.0)] = Field(
        default=60.0,
        description="Autoscaling: how long the load stays below the target before Serve removes a replica "
        "(with min_replicas 0, how long a model idles before it scales to zero).",
    )
    look_back_period_s: PositiveFloat = Field(
        default=12.0,
        description="Autoscaling: the window Serve averages requests in flight over (Ray's default is 30 s). "
        "Ray warns below 10 s (its deprecated metrics_interval_s).",
    )
    metrics_push_interval_s: PositiveFloat = Field(
        default=1.0,
        description="Autoscaling: how often each replica sends its load samples to Serve's "
        "controller (Ray's default is 10 s). Set on each deployment (Serve's metrics_interval_s: Ray "
        "2.60 reads no environment variable for it), on every cluster, Kubernetes included.",
    )
    max_ongoing_requests: PositiveInt = Field(
        default=32,
        description="Requests one replica takes at once (Ray's default of 5 collapses under load). An LLM "
        "replica takes at least four batches' worth, so that what waits for a slot waits in its engine, "
        "where autoscaling sees it.",
    )
    max_batch_size: PositiveInt = Field(
        default=32, description="Rows (or prompts) batched into one forward pass (`@serve.batch`; the engine's batch)."
    )
    batch_wait_timeout_s: Annotated[float, Field(ge=0.0, le=10.0)] = Field(
        default=0.0,
        description="How long a batch waits to fill. 0: a batch takes the requests that queued while "
        "the previous one ran (full under load, no added latency when idle).",
    )
    max_request_bytes: PositiveInt = Field(default=16 * 1024 * 1024, description="Larger bodies get 413.")
    max_error_rate: Fraction = Field(
        default=0.5,
        description="Share of a replica's requests failing (HTTP 500) over the watchdog's "
        "`error_window_s` at which the watchdog restarts that replica.",
    )
    memory_limit_bytes: PositiveInt | None = Field(
        default=None,
        description="RSS past which the watchdog restarts a replica (alone). "
        "Default: twice the planned memory of one replica, and at least that plus 1 GiB.",
    )
    ready_timeout_s: PositiveFloat = Field(
        default=180.0,
        description="How long a deploy (or the watchdog's restart) waits for the Serve app's replicas to run.",
    )
    cold_start_timeout_s: PositiveFloat = Field(
        default=60.0,
        description="How long a request waits for a replica when none is up (a model scaled to zero, "
        "or all its replicas down) before it is answered 503 with Retry-After. Local instance "
        "with haproxy ingress (HAProxy applies it).",
    )
    ingress: Literal["haproxy", "proxy"] = Field(
        default="haproxy",
        description="haproxy: Ray Serve's HAProxy in front of replicas that take HTTP themselves "
        "(least-connections routing, no Python proxy hop); proxy: Ray Serve's default Python proxy. "
        "Applies to the local Ray nodewise starts; start an existing cluster with the same "
        "RAY_SERVE_* variables (docs/how-to/several-machines.md).",
    )
    throughput_optimized: bool = Field(
        default=True,
        description="Ray Serve's throughput-optimized mode (gRPC between actors, user code and "
        "router on the replica's event loop, request logs buffered).",
    )
    drain_s: Annotated[float, Field(ge=0.0, le=300.0)] = Field(
        default=5.0,
        description="With haproxy ingress, how long a stopping replica keeps answering while "
        "HAProxy stops sending it requests (Ray's default is 30 s).",
    )
    retries: Annotated[int, Field(ge=0, le=5)] = Field(
        default=2,
        description="With haproxy ingress, how many times HAProxy sends a request again, to another "
        "replica, when its replica could not be reached or closed the connection without an answer "
        "(it died, was killed by the watchdog, or its node was lost). Only a request whose client "
        "has received nothing yet is sent again; nodewise's routes have no side effects, so the "
        "answer is the one the first replica would have given. 0: only connection failures are "
        "retried (Ray's default). A request that itself kills its replica reaches at most this "
        "many more.",
    )
    engine: bool = Field(
        default=True,
        description="A transformers text-generation model (one that fits one node) is served by the "
        "continuous-batching engine in each replica, with the OpenAI routes; false: one MLflow pyfunc "
        "call per request on /invocations only.",
    )
    default_new_tokens: PositiveInt = Field(
        default=16, description="Engine: tokens generated when a request names none."
    )
    max_new_tokens: PositiveInt = Field(default=256, description="Engine: most tokens one request may ask to generate.")

    @model_validator(mode="after")
    def _bounds_in_order(self) -> ServeSettings:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas}); "
                "raise max_replicas or lower min_replicas"
            )
        return self


class DeepSpeedSettings(_Section):
    """The multi-node backend: DeepSpeed tensor parallelism over ranks that mpirun starts."""

    port: PositiveInt = Field(
        default=8100, le=65535, description="The endpoint's port: the front's (serving/front.py), else rank 0's."
    )
    front: bool = Field(
        default=True, description="A front that outlives the group holds and repeats requests across its restarts."
    )
    rank0_port: PositiveInt | None = Field(
        default=None, le=65535, description="Rank 0's own port behind the front. Default: a free port, kept."
    )
    upgrade: Literal["auto", "surge", "replace"] = Field(
        default="auto",
        description=(
            "How a new version replaces a running group. surge: the new group starts beside the old one, is "
            "smoke-tested, then the front switches to it; replace: the old group stops first, the front holds "
            "requests meanwhile; auto: surge when there is room for a second group (hosts of the inventory the "
            "running group does not use, or this machine's free memory for local ranks), else replace."
        ),
    )
    hold_timeout_s: PositiveFloat = Field(
        default=60.0, description="Longest the front holds a request while the group is down (then 503)."
    )
    max_held: PositiveInt = Field(default=256, description="Requests the front holds at once; past it, 503 at once.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto", description="Weights dtype on the ranks. auto: float32 on CPU, float16 on GPU."
    )
    master_port: PositiveInt | None = Field(
        default=None, ge=1024, le=65535, description="torch.distributed rendezvous port. Default: a free port."
    )
    heartbeat_s: PositiveFloat = Field(default=1.0, description="How often each rank reports to rank 0.")
    heartbeat_timeout_s: PositiveFloat = Field(default=10.0, description="A rank silent this long is dead or hung.")
    tick_s: PositiveFloat = Field(default=2.0, description="Idle ranks step together this often.")
    request_timeout_s: PositiveFloat = Field(default=60.0, description="Longest one request may take (504).")
    ready_timeout_s: PositiveFloat = Field(
        default=600.0, description="Launch to every rank ready; the first launch builds DeepSpeed's op (~85 s)."
    )
    stop_grace_s: PositiveFloat = Field(default=10.0, description="SIGTERM to SIGKILL when stopping ranks.")
    max_batch_size: PositiveInt = Field(default=8, description="Sequences (or prompts) per request.")
    default_new_tokens: PositiveInt = Field(default=16, description="Tokens generated when a request names none.")
    max_new_tokens: PositiveInt = Field(default=256, description="Most tokens one request may ask to generate.")
    batching: bool = Field(
        default=True,
        description="Concurrent generations share decoding steps (continuous batching); false: one at a time.",
    )
    mpirun: str = Field(default="mpirun", description="Open MPI's launcher (a path or a name on PATH).")
    mpirun_args: list[str] = Field(
        default_factory=list, description="Extra mpirun arguments, e.g. ['--mca', 'btl_tcp_if_include', 'eth0']."
    )
    python: str | None = Field(
        default=None, description="Python with nodewise installed, same path on every host. Default: this one."
    )
    remote_shell: str = Field(
        default="ssh",
        min_length=1,
        description="How mpirun and nodewise reach other hosts (mpirun's plm_rsh_agent), called as "
        "`REMOTE_SHELL HOST CMD...`: ssh (the default) with keys for every host, or an agent of your own.",
    )
    host_check_timeout_s: PositiveFloat = Field(
        default=5.0, description="A host that does not run `true` through the remote shell this fast is down."
    )
    op_cache_dir: Path | None = Field(
        default=None,
        description="DeepSpeed's compiled ops (TORCH_EXTENSIONS_DIR). Default: torch_extensions in the state "
        "folder. Only the first launch that uses a folder builds them (~85 s).",
    )


class WatchdogSettings(_Section):
    """The watchdog: how often it checks, how long a canary may take, how many restarts it may make."""

    every_s: PositiveFloat = Field(default=30.0, description="Seconds between checks (`nodewise watchdog --every`).")
    canary_timeout_s: PositiveFloat = Field(default=10.0, description="Deadline of one canary inference.")
    max_restarts: PositiveInt = Field(default=3, description="Restarts of one deployment allowed per window.")
    window_s: PositiveFloat = Field(default=600.0, description="The window the restart budget counts over.")
    backoff_s: Annotated[float, Field(ge=0.0)] = Field(
        default=10.0, description="Wait after a restart before the next one; doubles with each restart in the window."
    )
    backoff_max_s: Annotated[float, Field(ge=0.0)] = Field(default=300.0, description="The longest backoff_s grows to.")
    error_window_s: PositiveFloat = Field(
        default=60.0, le=600.0, description="The window a Ray Serve replica's error rate is measured over."
    )
    min_requests: PositiveInt = Field(
        default=10, description="Requests a replica must have answered in the window before its error rate counts."
    )


class SmokeSettings(_Section):
    """The smoke test that follows every deploy."""

    rtol: PositiveFloat = Field(
        default=1e-4, description="Relative tolerance between the endpoint's answer and the model's own output."
    )
    atol: PositiveFloat = Field(
        default=1e-5, description="Absolute tolerance between the endpoint's answer and the model's own output."
    )
    reference_max_bytes: PositiveInt = Field(
        default=2 * 1024**3,
        description="Largest model the flow loads itself to compare outputs; above it the smoke "
        "test only checks that the endpoint answers with the right shape.",
    )
    timeout_s: PositiveFloat = Field(default=30.0, description="Deadline of the smoke test's request.")


class PlacementSettings(_Section):
    """How much of each device a plan may use."""

    headroom_fraction: Fraction = Field(default=0.9, description="Share of each device's memory a plan may fill.")


class TriggersSettings(_Section):
    """Registry promotions that start deploys: MLflow webhooks, or a poller."""

    alias: str = Field(default="champion", description="The alias whose promotion deploys a model.")
    webhook_secret: SecretStr | None = Field(
        default=None, description="The MLflow webhook's secret; the receiver refuses to start without one."
    )
    max_age_s: PositiveFloat = Field(default=300.0, description="Older (or future) deliveries are refused (401).")
    receiver_host: str = Field(default="127.0.0.1", description="Address the webhook receiver binds to.")
    receiver_port: PositiveInt = Field(default=8765, le=65535, description="Port of the webhook receiver.")
    prefect_port: PositiveInt = Field(default=4200, le=65535, description="`nodewise up`'s Prefect server.")
    mlflow_port: PositiveInt = Field(default=5000, le=65535, description="`nodewise up`'s MLflow server.")
    webhook_events: list[str] = Field(
        default=["model_version_alias.created"],
        description="MLflow events that announce a promotion (add model_version.created to deploy every new version).",
    )
    poll_every_s: PositiveFloat = Field(default=10.0, description="Seconds between registry polls (`nodewise poll`).")
    webhook_retries: Annotated[int, Field(ge=0, le=20)] = Field(
        default=8,
        description="How often `nodewise up`'s MLflow server resends a webhook the receiver did not take "
        "(a 5xx, e.g. 502 while Prefect is down), with backoff 2, 4, 8 ... 60 s: 8 covers about 3 minutes "
        "(MLflow's default, 3, about 6 s).",
    )


class RolloutSettings(_Section):
    """A challenger beside the champion (shadow or canary traffic) and the decision on it.

    Every field but ``challenger_alias`` and ``every_s`` can be set per model with a tag
    ``nodewise.rollout.<field>`` on the registered model or on the challenger's version (it wins);
    ``nodewise.rollout.mode`` and ``nodewise.rollout.share`` are the usual ones."""

    challenger_alias: str = Field(
        default="challenger", pattern=r"^[A-Za-z0-9_-]+$", description="The alias that starts a rollout."
    )
    mode: Literal["shadow", "canary"] = Field(
        default="shadow",
        description="shadow: the challenger gets a copy of requests, clients see only the champion's answers; "
        "canary: the challenger answers a share of requests.",
    )
    share: list[Fraction] = Field(
        default=[1.0],
        min_length=1,
        description="shadow: the share of requests copied (one value); canary: the shares in steps, e.g. "
        "0.05,0.25,0.5 (each step is judged on its own requests; passing the last one promotes).",
    )
    compare: Literal["class", "allclose", "distance"] = Field(
        default="allclose",
        description="Shadow agreement per row: class (same argmax or label), allclose (rtol/atol), "
        "distance (mean |a-b| <= max_distance).",
    )
    rtol: Annotated[float, Field(ge=0.0)] = Field(default=1e-3, description="compare=allclose: relative tolerance.")
    atol: Annotated[float, Field(ge=0.0)] = Field(default=1e-5, description="compare=allclose: absolute tolerance.")
    max_distance: Annotated[float, Field(ge=0.0)] = Field(
        default=0.1, description="compare=distance: the largest mean |a-b| per row that agrees."
    )
    min_requests: PositiveInt = Field(
        default=200, description="Challenger calls (per canary step) before the decision is taken."
    )
    max_error_rate: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        default=0.01, description="The challenger's failed share of its calls at most this (else rolled back)."
    )
    max_p99_ratio: PositiveFloat = Field(
        default=2.0,
        description="The challenger's p99 latency at most this times the champion's (a like version measured "
        "1.55x at p99 on a busy 2-core host, where both share the CPUs: a tighter ratio there is noise).",
    )
    min_agreement: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        default=0.99, description="Shadow: rows the challenger answers like the champion, at least this share."
    )
    every_s: PositiveFloat = Field(default=30.0, description="Seconds between decisions (the flow's schedule).")

    @field_validator("share", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        if isinstance(value, str) and not value.lstrip().startswith("["):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, int | float):
            return [value]
        return value


# An image as Kubernetes takes it: [registry[:port]/]path[:tag][@sha256:digest]
IMAGE_REFERENCE = re.compile(
    r"[a-z0-9]+([._-][a-z0-9]+)*(\.[a-z0-9-]+)*(:[0-9]+)?(/[a-z0-9]+([._-]{1,2}[a-z0-9]+)*)*"
    r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[a-f0-9]{64})?"
)


class KubernetesSettings(_Section):
    """The Kubernetes target: where manifests go and what they run."""

    namespace: str = Field(
        default="default",
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        max_length=63,
        description="Namespace of the rendered manifests (and of what `render --apply` applies and watches).",
    )
    image: str = Field(
        default=f"nodewise:{__version__}",
        description="Image every pod runs (deployments/image, scripts/build-image.sh tags nodewise:VERSION): "
        "a registry path the nodes pull from, best pinned by digest (REGISTRY/nodewise@sha256:...), "
        "which no later push can change under a running job.",
    )
    ray_version: str = Field(default="2.60.0", description="KubeRay's rayVersion: the image's Ray.")
    credentials_secret: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        max_length=253,
        description="A Kubernetes Secret (in the namespace) every pod takes its environment from: "
        "MLFLOW_TRACKING_URI with its password, MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN, AWS_*... "
        "Rendered manifests name it, never a value; required when the tracking URI carries a password.",
    )
    serve_throughput_optimized: bool = Field(
        default=True,
        description="Ray Serve's throughput-optimized mode in the RayService pods (RAY_SERVE_THROUGHPUT_OPTIMIZED).",
    )
    allow_local: bool = Field(
        default=False,
        description="Render (and promote to Kubernetes) even though the tracking URI or a model's artifacts "
        "are on this machine: for a kind or minikube cluster here. Otherwise refused (`render --allow-local`).",
    )
    serve_metrics_push_interval_s: PositiveFloat = Field(
        default=1.0,
        description="How often each replica in the RayService sends its load samples to Serve's "
        "autoscaler (the app's metrics_interval_s in serveConfigV2; Ray's default is 10 s). "
        "The local counterpart is serve.metrics_push_interval_s.",
    )
    idle_node_timeout_s: PositiveInt = Field(
        default=60,
        description="With autoscaling (max_replicas above min_replicas), how long a RayService worker pod "
        "stays idle before KubeRay's autoscaler removes it (its idleTimeoutSeconds).",
    )
    ready_timeout_s: PositiveFloat = Field(
        default=900.0, description="How long `render --apply` (and a promotion to Kubernetes) waits for readiness."
    )
    multi_node: Literal["mpijob", "lws"] = Field(
        default="mpijob", description="Multi-node plans as a Kubeflow MPIJob or a LeaderWorkerSet."
    )

    @field_validator("image")
    @classmethod
    def _image_reference(cls, value: str) -> str:
        if not IMAGE_REFERENCE.fullmatch(value):
            raise ValueError(
                f"{value!r} is not an image reference; write [REGISTRY[:PORT]/]PATH[:TAG][@sha256:DIGEST], "
                "e.g. registry.example.com/ml/nodewise@sha256:<64 hex digits> or nodewise:0.1.0"
            )
        return value


class MetricsSettings(_Section):
    """Prometheus metrics (serving/metrics.py's schema): serving processes and the control-plane exporter."""

    enabled: bool = Field(
        default=True,
        description="Every serving process answers GET /metrics: a Ray Serve replica under its app's route and on "
        "a port of its own (its scrape target), DeepSpeed's rank 0 on its serving port.",
    )
    latency_target_s: PositiveFloat = Field(
        default=1.0, description="The p99 request latency a deployment should keep under; the alert rules read it."
    )
    exporter_host: str = Field(default="127.0.0.1", description="Where `nodewise up`'s control-plane exporter listens.")
    exporter_port: int = Field(
        default=9464,
        ge=0,
        le=65535,
        description="The control-plane exporter's port (`nodewise up`); 0: none is started.",
    )
    refresh_s: PositiveFloat = Field(
        default=5.0, description="How often the exporter rewrites the scrape targets (<state>/prometheus/targets/)."
    )


class Settings(BaseSettings):
    """All of nodewise's configuration."""

    model_config = SettingsConfigDict(env_prefix="NODEWISE_", env_nested_delimiter="__", extra="forbid", frozen=True)

    state_dir: Path = Field(
        default=Path(".nodewise"),
        description="Folder for everything nodewise keeps locally: MLflow DB and artifacts, "
        "PREFECT_HOME, Ray's temp dir, deployment records.",
    )
    mlflow: MlflowSettings = MlflowSettings()
    prefect: PrefectSettings = PrefectSettings()
    ray: RaySettings = RaySettings()
    serve: ServeSettings = ServeSettings()
    deepspeed: DeepSpeedSettings = DeepSpeedSettings()
    watchdog: WatchdogSettings = WatchdogSettings()
    smoke: SmokeSettings = SmokeSettings()
    placement: PlacementSettings = PlacementSettings()
    kubernetes: KubernetesSettings = KubernetesSettings()
    triggers: TriggersSettings = TriggersSettings()
    rollout: RolloutSettings = RolloutSettings()
    metrics: MetricsSettings = MetricsSettings()

    @model_validator(mode="after")
    def _ports_differ(self) -> Settings:
        if self.ray.address is None and 0 <= self.serve.port - self.ray.port <= 3:
            raise ValueError(
                f"serve.port ({self.serve.port}) collides with ray.port ({self.ray.port}), which "
                "uses it and the next three ports; pick another serve.port"
            )
        return self

    # Derived locations. Resolved to absolute paths: Ray and MLflow need them.
    @property
    def state_path(self) -> Path:
        return self.state_dir.expanduser().resolve()

    @property
    def state(self) -> StateFolder:
        """Every path under the state folder (nodewise/core/state.py)."""
        return StateFolder(self.state_path, self.deepspeed.op_cache_dir)

    @property
    def tracking_uri(self) -> str:
        return self.mlflow.tracking_uri or f"sqlite:///{self.state.mlflow_db}"

    @property
    def registry_uri(self) -> str:
        return self.mlflow.registry_uri or self.tracking_uri


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment, with explicit overrides on top."""
    return Settings(**overrides)  # type: ignore[arg-type]


# Flows take only what a user chooses as parameters (Prefect stores every parameter of every run,
# and shows it in its UI): the settings reach a flow run from the environment, or from the caller
# through this context (a CLI command, a test), never as a parameter.
_CURRENT: ContextVar[Settings | None] = ContextVar("nodewise_settings", default=None)


@contextlib.contextmanager
def using_settings(settings: Settings) -> Iterator[Settings]:
    """Flows started inside this block (and their subflows) use ``settings``."""
    token = _CURRENT.set(settings)
    try:
        yield settings
    finally:
        _CURRENT.reset(token)


def current_settings() -> Settings:
    """The settings of the caller's ``using_settings`` block, else read from the environment."""
    return _CURRENT.get() or load_settings()
