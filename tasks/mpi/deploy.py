"""Serving a model that needs several nodes: DeepSpeed tensor parallelism over MPI ranks.

``build_deepspeed_spec`` turns a multi-node plan into the spec every rank reads;
``deploy_cluster`` launches the job (beside the running one when there is room, else in its
place: ``tasks/mpi/upgrade.py``), waits for every rank and checks it (``smoke_test_lm``: the
endpoint's logits against the model run whole in this process), leaving or putting the previous
version back if the new one fails either.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from nodewise.core.errors import ClusterUnavailable, DeployFailed, NotEnoughHosts, UnsupportedModel
from nodewise.core.procs import session_members
from nodewise.core.settings import Settings, SmokeSettings
from serving.autotp import architecture_refusal, uneven_heads
from serving.dist_env import is_local_host
from serving.spec import DeepSpeedSpec, redact_uri
from tasks.mpi.front import ensure_front, follow, rank0_port, stop_front
from tasks.mpi.health import exit_code, wait_ready
from tasks.mpi.hosts import choose_hosts
from tasks.mpi.launcher import launch, stop_cluster
from tasks.mpi.records import LaunchedCluster, Placement, read_cluster
from tasks.mpi.upgrade import FrontWatch, Upgrade, surge, upgrade_room
from tasks.planning.placement import PlacementPlan
from tasks.planning.registry import ResolvedModel, artifact_file, load_input_example
from tasks.records import app_name_for
from tasks.smoke import SmokeResult, post_json

T = TypeVar("T")


def build_deepspeed_spec(model: ResolvedModel, plan: PlacementPlan, settings: Settings) -> DeepSpeedSpec:
    """The spec for ``model`` as a multi-node ``plan`` places it.

    Raises:
        UnsupportedModel: a flavour or architecture the DeepSpeed backend cannot shard.
    """
    if "transformers" in model.flavors:
        flavor = "transformers"
        _check_architecture(model, plan.tp_size)
    elif model.flavor == "pytorch":
        flavor = "pytorch"
    else:
        raise UnsupportedModel(
            f"{model.pinned_uri} needs {plan.nodes} nodes, and the multi-node backend shards "
            f"transformers or pytorch models; this one has flavours {model.flavors}: log it with "
            "mlflow.transformers or mlflow.pytorch"
        )
    ds = settings.deepspeed
    gpu = plan.device_kind == "gpu"
    dtype = ds.dtype if ds.dtype != "auto" else ("float16" if gpu else "float32")
    local = all(is_local_host(h) for h in plan.hosts)  # the launcher's own test: ranks all on this machine
    return DeepSpeedSpec(
        app_name=app_name_for(model.name),
        model_uri=model.pinned_uri,
        artifact_uri=model.artifact_uri,
        model_name=model.name,
        model_version=model.version,
        tracking_uri=redact_uri(settings.tracking_uri),  # its password reaches the ranks in their environment
        registry_uri=redact_uri(settings.registry_uri),
        flavor=flavor,
        tp_size=plan.ranks,
        device="cuda" if gpu else "cpu",
        dtype=dtype,
        host="127.0.0.1" if local else "0.0.0.0",
        port=rank0_port(settings, app_name_for(model.name)) if ds.front else ds.port,  # the front takes ds.port
        torch_threads=plan.torch_threads,
        heartbeat_s=ds.heartbeat_s,
        heartbeat_timeout_s=ds.heartbeat_timeout_s,
        tick_s=ds.tick_s,
        request_timeout_s=ds.request_timeout_s,
        max_request_bytes=settings.serve.max_request_bytes,
        max_batch_size=ds.max_batch_size,
        default_new_tokens=min(ds.default_new_tokens, ds.max_new_tokens),
        max_new_tokens=ds.max_new_tokens,
        batching=ds.batching,
        max_tokens_in_flight=plan.kv_tokens or None,
        metrics=settings.metrics.enabled,
        latency_target_s=settings.metrics.latency_target_s,
    )


def _check_architecture(model: ResolvedModel, tp_size: int) -> None:
    """Refuse before launching what AutoTP would refuse on every rank (serving/autotp.py's rule)."""
    with artifact_file(model, "model/config.json") as path:
        if path is None:
            return
        config = json.loads(Path(path).read_text())
    model_type = str(config.get("model_type", "?"))
    refused = architecture_refusal(model_type, tp_size, model_type)
    if refused:
        raise UnsupportedModel(
            f"{model.pinned_uri} ({model_type}) needs {tp_size} tensor-parallel ranks, but {refused}; register "
            "a supported architecture, or give the model a node that holds it whole"
        )
    uneven = uneven_heads(tp_size, config)
    if uneven:
        raise UnsupportedModel(f"{model.pinned_uri} has {uneven}; declare nodes so that the rank count divides it")


def deploy_cluster(
    spec: DeepSpeedSpec, plan: PlacementPlan, settings: Settings, check: Callable[[str], T]
) -> tuple[str, T, Upgrade]:
    """Put a group for ``spec`` in place of the app's, wait until every rank is ready, ``check`` it.

    With a group running and room for a second (``upgrade_room``), the new group starts beside it,
    is checked at its rank 0, and the front switches to it before the old one stops
    (``tasks/mpi/upgrade.py``); a failure stops the new group and the old one serves on. Otherwise
    the old ranks stop, the front holds requests, the new ones start (DeepSpeed ranks cannot be
    swapped one by one); if they fail to start or ``check(endpoint)`` raises ``DeployFailed``, the
    previous spec is relaunched, the front holding throughout. Returns the endpoint, what ``check``
    returned, and how the group was replaced (with the front's hold).

    Raises:
        DeployFailed: the new version did not start or failed ``check``; says what serves now.
    """
    previous = read_cluster(settings, spec.app_name)
    if previous is not None and _alive(previous):
        candidates, why = upgrade_room(plan, previous, settings)
        if candidates is not None:
            try:
                result, drained = surge(spec, plan, candidates, previous, settings, check)
            except NotEnoughHosts as e:  # free hosts that do not answer: no room after all (nothing started)
                return _replace(spec, plan, settings, check, previous, f"no room: {e}")
            endpoint = _front_endpoint(settings, spec, read_cluster(settings, spec.app_name) or previous)
            return endpoint, result, Upgrade(mode="surge", why=why, drained_s=drained)
        return _replace(spec, plan, settings, check, previous, why)
    return _replace(spec, plan, settings, check, previous, "no group was running" if previous else "")


def _replace(
    spec: DeepSpeedSpec,
    plan: PlacementPlan,
    settings: Settings,
    check: Callable[[str], T],
    previous: LaunchedCluster | None,
    why: str,
) -> tuple[str, T, Upgrade]:
    """Stop the app's group, launch ``spec``'s, check it; relaunch the previous one if it fails."""
    previous_spec = (
        DeepSpeedSpec.model_validate_json(Path(previous.spec_path).read_text()) if previous is not None else None
    )
    planned = Placement(
        hosts=plan.hosts or ["localhost"] * plan.nodes, ranks_per_host=plan.devices_per_node, spares=plan.spare_hosts
    )
    hosts, _ = choose_hosts(planned, settings)  # a node that is down now is replaced by a spare, or refused
    spares = [h for h in [*planned.hosts, *planned.spares] if h not in hosts]
    watch = FrontWatch(settings, spec.app_name)
    stop_cluster(settings, spec.app_name)
    cluster = launch(spec, hosts, plan.devices_per_node, settings, spares=spares)
    try:
        wait_ready(cluster, settings.deepspeed.ready_timeout_s)
        endpoint = _front_endpoint(settings, spec, cluster)
        result = check(endpoint)
    except DeployFailed as e:
        stop_cluster(settings, spec.app_name)
        outcome = "nothing served before"
        if previous_spec is not None and previous is not None:
            restored = launch(previous_spec, previous.hosts, previous.ranks // len(previous.hosts), settings)
            try:
                wait_ready(restored, settings.deepspeed.ready_timeout_s)
                follow(settings, spec.app_name, restored.endpoint)
                outcome = f"version {previous_spec.model_version} serves again"
            except DeployFailed as again:
                stop_cluster(settings, spec.app_name)
                outcome = f"version {previous_spec.model_version} did not come back either: {again}"
            held_s, held = watch.stop()
            outcome += f"; the front held {held} requests for {held_s:.1f} s"
        if previous is None:
            stop_front(settings, spec.app_name)
        raise DeployFailed(f"{e} (rolled back: {outcome})") from e
    if previous is None:
        return endpoint, result, Upgrade(mode="first")
    held_s, held = watch.stop()
    return endpoint, result, Upgrade(mode="replace", why=why, held_s=held_s, held_requests=held)


def _alive(cluster: LaunchedCluster) -> bool:
    """The recorded group's mpirun still runs (a stopped or crashed one is replaced, not surged)."""
    return exit_code(cluster) is None and bool(session_members(cluster.pid))


def _front_endpoint(settings: Settings, spec: DeepSpeedSpec, cluster: LaunchedCluster) -> str:
    """What users call: the front, which outlives the group (tasks/mpi/front.py); rank 0 without one."""
    if not settings.deepspeed.front:
        return cluster.endpoint
    try:
        return ensure_front(settings, spec.app_name, spec.host, cluster.endpoint).endpoint
    except ClusterUnavailable as e:
        raise DeployFailed(str(e)) from e


def probe_ids(model: ResolvedModel, spec: DeepSpeedSpec) -> np.ndarray:
    """Token ids to smoke-test with: the input example (tokenized for text), else a fixed probe."""
    example, _ = load_input_example(model)
    if example is not None:
        array = np.asarray(example.to_numpy() if hasattr(example, "to_numpy") else example)
        if array.dtype.kind in "iu":
            return array.reshape(1, -1) if array.ndim == 1 else array
        if array.dtype.kind in "USO" and spec.flavor == "transformers":
            from serving._lm import LanguageModel

            tokenizer = LanguageModel.load_tokenizer(spec)
            if tokenizer is not None:
                ids = tokenizer(str(array.reshape(-1)[0]))["input_ids"]
                if ids:
                    return np.asarray([ids], dtype=np.int64)
    return np.arange(8, dtype=np.int64).reshape(1, -1) % 2 + 3


def smoke_test_lm(endpoint: str, model: ResolvedModel, spec: DeepSpeedSpec, settings: SmokeSettings) -> SmokeResult:
    """The endpoint's logits for the probe equal the whole model's own (TP changes nothing but speed).

    Raises:
        DeployFailed: no answer, an error status, or logits beyond tolerance.
    """
    ids = probe_ids(model, spec)
    body: dict[str, Any] = {"inputs": ids.tolist()}
    answer = post_json(f"{endpoint}/invocations", body, settings.timeout_s)
    got = np.asarray(answer["predictions"], dtype=np.float32)
    if model.artifact_bytes > settings.reference_max_bytes:
        return SmokeResult(request=body, prediction=list(got.shape), compared=False)
    from serving._lm import LanguageModel

    reference = LanguageModel.load(spec.model_copy(update={"tp_size": 1, "device": "cpu", "dtype": "float32"}))
    expected = reference.forward(ids)
    if got.shape != expected.shape or not np.allclose(got, expected, rtol=settings.rtol, atol=1e-4):
        diff = float(np.max(np.abs(got - expected))) if got.shape == expected.shape else float("inf")
        raise DeployFailed(
            f"smoke test: the ranks' logits differ from the whole model's (shape {list(got.shape)} vs "
            f"{list(expected.shape)}, max abs diff {diff:.3g})"
        )
    return SmokeResult(
        request=body, prediction=list(got.shape), compared=True, max_abs_diff=float(np.max(np.abs(got - expected)))
    )
