"""Deploying a model to Ray Serve from a placement plan."""

from __future__ import annotations

import re
import time
from typing import Any

from nodewise.core.errors import DeployFailed
from nodewise.core.runtime import SOURCE_ROOT
from nodewise.core.settings import ServeSettings, Settings
from serving.rollout import RolloutConfig
from serving.spec import ModelServeSpec, redact_uri
from tasks.planning.placement import PlacementPlan
from tasks.planning.registry import ResolvedModel
from tasks.records import app_name_for

_TERMINAL_BAD = ("DEPLOY_FAILED", "UNHEALTHY")
ENGINE_QUEUE_BATCHES = 4  # requests an engine replica takes: this many batches' worth


def build_spec(
    model: ResolvedModel, plan: PlacementPlan, settings: Settings, serve: ServeSettings | None = None
) -> ModelServeSpec:
    """The serving spec for ``model`` as ``plan`` places it; ``serve``: the model's own Serve
    settings (``settings.serve`` with its tags applied, see tasks/planning/serve_config.py)."""
    serve = serve or settings.serve
    app = app_name_for(model.name)
    # A torch.export ("pt2") model only takes its input example's batch size: no batching.
    batch = 1 if model.pytorch_format == "pt2" else serve.max_batch_size
    # A fixed count (serve.replicas), or autoscaling from the plan's replicas up to max_replicas,
    # never past what the inventory holds.
    capacity = plan.capacity_replicas or plan.replicas
    fixed = serve.replicas is not None
    ceiling = plan.replicas if fixed else max(plan.replicas, min(serve.max_replicas, capacity))
    if fixed:
        ceiling_reason = "a fixed count (serve.replicas)"
    elif serve.max_replicas <= capacity:
        ceiling_reason = f"max_replicas {serve.max_replicas}"
    else:
        ceiling_reason = plan.capacity_reason or f"the inventory holds {capacity}"
    # scale to zero (opt-in): the floor is 0, the plan's replicas are only the first ones
    floor = 0 if not fixed and serve.min_replicas == 0 else plan.replicas
    engine = serve.engine and model.task == "text-generation"
    memory_limit = serve.memory_limit_bytes or max(2 * plan.needed_bytes, plan.needed_bytes + 2**30)
    return ModelServeSpec(
        app_name=app,
        route_prefix=f"/{app}",
        model_uri=model.pinned_uri,
        model_name=model.name,
        model_version=model.version,
        tracking_uri=redact_uri(settings.tracking_uri),  # its password reaches the replicas in their environment
        registry_uri=redact_uri(settings.registry_uri),
        flavor="pytorch" if model.flavor == "pytorch" else "python_function",
        input_dtype=model.input_dtype,
        input_shape=model.input_shape,
        min_replicas=floor,
        max_replicas=ceiling,
        ceiling_reason=ceiling_reason,
        target_ongoing_requests=serve.target_ongoing_requests,
        upscale_delay_s=serve.upscale_delay_s,
        downscale_delay_s=serve.downscale_delay_s,
        look_back_period_s=serve.look_back_period_s,
        metrics_push_interval_s=serve.metrics_push_interval_s,
        num_cpus=plan.num_cpus_per_replica,
        num_gpus=plan.num_gpus_per_replica,
        tp_size=plan.tp_size,
        # the plan's threads share the cores among its replicas; autoscaled, among the most there can be
        torch_threads=max(1, plan.torch_threads * plan.replicas // ceiling),
        # An engine replica takes several batches' worth: what waits for a slot waits in its engine,
        # where the autoscaling rule sees it (capped by Serve at max_ongoing_requests, it would queue
        # in front of the replica, unseen, and no replica would be added)
        max_ongoing_requests=max(serve.max_ongoing_requests, ENGINE_QUEUE_BATCHES * batch)
        if engine
        else serve.max_ongoing_requests,
        max_batch_size=batch,
        batch_wait_timeout_s=serve.batch_wait_timeout_s,
        max_request_bytes=serve.max_request_bytes,
        max_error_rate=serve.max_error_rate,
        memory_limit_bytes=memory_limit,
        device="cuda" if plan.device_kind == "gpu" else "cpu",
        engine=engine,
        max_tokens_in_flight=plan.kv_tokens or None,
        default_new_tokens=min(serve.default_new_tokens, serve.max_new_tokens),
        max_new_tokens=serve.max_new_tokens,
        metrics=settings.metrics.enabled,
        latency_target_s=settings.metrics.latency_target_s,
    )


def endpoint_url(settings: Settings, spec: ModelServeSpec) -> str:
    host = "127.0.0.1" if settings.serve.host in ("0.0.0.0", "::") else settings.serve.host
    return f"http://{host}:{settings.serve.port}{spec.route_prefix}"


def deploy_app(
    spec: ModelServeSpec,
    settings: Settings,
    remote_cluster: bool,
    rollout: RolloutConfig | None = None,
    routed: bool = True,
) -> str:
    """Deploy (or update in place) the Serve app for ``spec``; wait until it is RUNNING.

    ``rollout``: a challenger beside it (serving/rollout.py); the same spec deployed again with
    another ``rollout`` only reconfigures the running replicas. ``routed=False``: no HTTP route
    (a challenger, which only its champion's replicas call).
    Returns the endpoint URL. Raises DeployFailed if the app fails or times out.
    """
    from ray import serve

    from serving.app import build_app

    serve.start(http_options={"host": settings.serve.host, "port": settings.serve.port})
    runtime_env: dict[str, Any] | None = None
    if remote_cluster:  # an existing cluster's nodes have neither nodewise's code nor its environment
        runtime_env = {"py_modules": shipped_serving_package()}
        hidden = {
            name: uri
            for name, uri in (
                ("MLFLOW_TRACKING_URI", settings.tracking_uri),
                ("MLFLOW_REGISTRY_URI", settings.registry_uri),
            )
            if redact_uri(uri) != uri
        }
        if hidden:  # the whole URIs go in the replicas' environment, never in the spec
            runtime_env["env_vars"] = hidden
    app = build_app(spec, runtime_env=runtime_env, rollout=rollout, versioned=True)
    serve._run(app, _blocking=False, name=spec.app_name, route_prefix=spec.route_prefix if routed else None)
    # Our local instance grows only with ray.max_added_nodes: otherwise unschedulable replicas fail
    # at once. An external cluster may be autoscaling, so there we wait out the timeout.
    grows = remote_cluster or settings.ray.max_added_nodes > 0
    wait_until_running(spec.app_name, settings.serve.ready_timeout_s, fail_unschedulable=not grows)
    return endpoint_url(settings, spec)


def shipped_serving_package() -> list[str]:
    """``serving/`` uploaded to the cluster (a gcs:// URI): an existing cluster's nodes do not
    have nodewise's code. Serve's config accepts only URIs there, not local paths."""
    from ray._private.runtime_env.py_modules import upload_py_modules_if_needed

    local = {"py_modules": [str(SOURCE_ROOT / "serving")]}
    return list(upload_py_modules_if_needed(local, include_gitignore=True)["py_modules"])


def wait_until_running(app_name: str, timeout_s: float, fail_unschedulable: bool = True) -> None:
    """Poll Serve until the app is RUNNING; raise DeployFailed on failure or timeout."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    status, message = "NOT_STARTED", ""
    while time.monotonic() < deadline:
        app = serve.status().applications.get(app_name)
        if app is not None:
            status = _value(app.status)
            # The deployments' messages hold the replica's own error; the app's is generic.
            message = _deployment_messages(app) or app.message
            if status == "RUNNING":
                return
            if status in _TERMINAL_BAD:
                break
            if (
                fail_unschedulable and "to be scheduled" in message
            ):  # Serve says so after 30 s; waiting longer will not help
                raise DeployFailed(
                    f"Serve app {app_name!r} cannot be placed: {_short(message)}; free capacity with "
                    "`nodewise down` or by removing another deployment, or add nodes"
                )
        time.sleep(0.5)
    else:
        message = message or f"still {status} after {timeout_s:.0f} s"
    raise DeployFailed(
        f"Serve app {app_name!r} did not become RUNNING ({status}): {_short(message)}; "
        "see the replica logs in the Ray temp dir, or raise NODEWISE_SERVE__READY_TIMEOUT_S"
    )


def _value(status: Any) -> str:
    """Serve's statuses are str enums; use their value ("RUNNING")."""
    return str(getattr(status, "value", status))


def _deployment_messages(app: Any) -> str:
    return " ".join(d.message for d in app.deployments.values() if getattr(d, "message", ""))


def _short(text: str) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # Ray colours its tracebacks
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    # Serve puts the replica's traceback in the message: its last line names the error.
    return (lines[-1] if lines else text)[:400]


def delete_app(app_name: str) -> None:
    """Delete the Serve app (no-op if it does not exist)."""
    from ray import serve

    if app_name in serve.status().applications:
        serve.delete(app_name)


def rollback(spec: ModelServeSpec, previous: dict[str, Any] | None, settings: Settings, remote_cluster: bool) -> str:
    """Put back what served before a failed deploy: the previous spec, or nothing."""
    if previous is None:
        delete_app(spec.app_name)
        return f"deleted {spec.app_name} (nothing served before)"
    deploy_app(ModelServeSpec.model_validate(previous), settings, remote_cluster)
    return f"restored {spec.app_name} to version {previous['model_version']}"
