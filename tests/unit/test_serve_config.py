"""Per-model Serve settings from tags, the spec built from a plan, and Serve's process environment."""

from pathlib import Path

import pytest

from nodewise.core.runtime import library_environment, serve_environment
from nodewise.core.settings import ServeSettings, Settings
from serving.app import build_app
from tasks.planning.placement import PlacementPlan
from tasks.planning.registry import ResolvedModel
from tasks.planning.serve_config import InvalidServeOverride, serve_settings_for
from tasks.rayserve.apps import build_spec

from .factories import resolved_model

GIB = 1024**3


def model(tags: dict[str, str] | None = None, model_tags: dict[str, str] | None = None) -> ResolvedModel:
    return resolved_model(
        name="fraud",
        version="3",
        pinned_uri="models:/fraud/3",
        flavors=["python_function", "pytorch"],
        flavor="pytorch",
        pytorch_format="pickle",
        tags=tags or {},
        model_tags=model_tags or {},
    )


def plan(replicas: int = 2, capacity: int = 6, tp: int = 1) -> PlacementPlan:
    return PlacementPlan(
        fits=True,
        backend="ray_serve",
        layout="shared-device" if tp == 1 else "multi-device",
        needed_bytes=GIB,
        budget_bytes=10 * GIB,
        largest_budget_bytes=10 * GIB,
        tp_size=tp,
        replicas=replicas,
        capacity_replicas=capacity,
        num_cpus_per_replica=0.5 if tp == 1 else 1.0,
        num_gpus_per_replica=0.0 if tp == 1 else float(tp),
        device_kind="cpu" if tp == 1 else "gpu",
    )


def test_version_tags_override_model_tags_which_override_settings() -> None:
    base = ServeSettings(max_batch_size=32, max_replicas=3)
    merged = serve_settings_for(
        model(
            tags={"nodewise.serve.max_batch_size": "8", "other.tag": "x"},
            model_tags={"nodewise.serve.max_batch_size": "16", "nodewise.serve.upscale_delay_s": "1.5"},
        ),
        base,
    )
    assert (merged.max_batch_size, merged.upscale_delay_s, merged.max_replicas) == (8, 1.5, 3)
    assert serve_settings_for(model(), base) is base


@pytest.mark.parametrize(
    ("tags", "message"),
    [
        ({"nodewise.serve.max_replicas": "many"}, r"model version tag nodewise.serve.max_replicas='many': .*integer"),
        ({"nodewise.serve.replicaz": "2"}, r"'nodewise.serve.replicaz' of models:/fraud/3 is not a setting"),
        (
            {"nodewise.serve.min_replicas": "4", "nodewise.serve.max_replicas": "2"},
            r"max_replicas \(2\) is below min_replicas \(4\)",
        ),
        ({"nodewise.serve.batch_wait_timeout_s": "-1"}, r"batch_wait_timeout_s='-1': .*greater than or equal to 0"),
    ],
)
def test_bad_override_tags_name_the_tag_and_the_fix(tags: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidServeOverride, match=message):
        serve_settings_for(model(tags=tags), ServeSettings())


def test_spec_autoscales_by_default_up_to_what_the_inventory_holds(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path)
    auto = build_spec(model(), plan(replicas=1, capacity=6), settings)
    assert (auto.min_replicas, auto.max_replicas) == (1, 4)  # the default ceiling, 4
    options = build_app(auto)._bound_deployment._deployment_config.autoscaling_config
    assert (options.min_replicas, options.max_replicas, options.target_ongoing_requests) == (1, 4, 2.0)
    assert (options.upscale_delay_s, options.look_back_period_s, options.metrics_interval_s) == (2.0, 12.0, 1.0)
    assert options.policy.policy_function == "serving.autoscaling:scale_on_load"  # nodewise's rule
    assert auto.ceiling_reason == "max_replicas 4"
    scaled = build_spec(model(), plan(replicas=2, capacity=6), settings, ServeSettings(max_replicas=10))
    assert (scaled.min_replicas, scaled.max_replicas) == (2, 6)  # capped at what the inventory holds
    assert scaled.ceiling_reason == "the inventory holds 6"
    fixed = build_spec(model(), plan(replicas=2), settings, ServeSettings(replicas=2))
    assert (fixed.min_replicas, fixed.max_replicas) == (2, 2)
    assert fixed.ceiling_reason == "a fixed count (serve.replicas)"
    config = build_app(fixed)._bound_deployment._deployment_config
    assert (config.num_replicas, config.autoscaling_config) == (2, None)
    # The memory limit defaults to twice the planned memory, and at least that plus 1 GiB.
    assert fixed.memory_limit_bytes == 2 * GIB


def test_scale_to_zero_is_opt_in_and_a_deploy_still_starts_one_replica(tmp_path: Path) -> None:
    from tasks.planning.plan import desired_replicas

    zero = ServeSettings(min_replicas=0)
    assert desired_replicas(zero) == 1  # the deploy proves the model loads
    spec = build_spec(model(), plan(replicas=1, capacity=6), Settings(state_dir=tmp_path), zero)
    assert (spec.min_replicas, spec.max_replicas) == (0, 4)
    options = build_app(spec)._bound_deployment._deployment_config.autoscaling_config
    assert (options.min_replicas, options.initial_replicas, options.max_replicas) == (0, 1, 4)
    # a fixed count wins over the floor; the default floor is 1
    fixed = build_spec(
        model(), plan(replicas=2), Settings(state_dir=tmp_path), ServeSettings(min_replicas=0, replicas=2)
    )
    assert (fixed.min_replicas, fixed.max_replicas) == (2, 2)
    assert fixed.ceiling_reason == "a fixed count (serve.replicas)"
    assert ServeSettings().min_replicas == 1
    tagged = serve_settings_for(model(model_tags={"nodewise.serve.min_replicas": "0"}), ServeSettings())
    assert tagged.min_replicas == 0


def test_multi_device_replica_reserves_its_devices_together(tmp_path: Path) -> None:
    spec = build_spec(model(), plan(replicas=1, capacity=2, tp=4), Settings(state_dir=tmp_path))
    deployment = build_app(spec)._bound_deployment
    replica = deployment._replica_config
    assert replica.placement_group_bundles == [{"CPU": 1.0, "GPU": 1.0}] + [{"GPU": 1.0}] * 3
    assert replica.placement_group_strategy == "STRICT_PACK"
    assert replica.ray_actor_options["num_gpus"] == 1.0


def test_serve_environment_reaches_haproxy_paths_inside_short_state_folders(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path / ("x" * 80))
    env = serve_environment(settings)
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    hap = settings.state.haproxy
    assert env["RAY_SERVE_HAPROXY_SOCKET_PATH"] == str(hap / "admin.sock")
    # Serve adds "/<56-char node id>/metrics.sock"; HAProxy refuses socket paths of 97+ characters.
    assert len(env["RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH"]) + 57 < 97
    assert "/haproxy-serve" not in " ".join(env.values())
    # a request whose replica died without answering goes to another replica, twice at most
    assert (env["RAY_SERVE_HAPROXY_RETRY_ON"], env["RAY_SERVE_HAPROXY_RETRIES"]) == (
        "conn-failure empty-response junk-response",
        "2",
    )
    never = serve_environment(Settings(state_dir=tmp_path, serve={"retries": 0}))
    assert never["RAY_SERVE_HAPROXY_RETRY_ON"] == "conn-failure"  # Ray's own default
    assert "RAY_SERVE_HAPROXY_RETRIES" not in never
    proxy = serve_environment(Settings(state_dir=tmp_path, serve={"ingress": "proxy"}))
    assert proxy["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "0"
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in proxy
    # An existing cluster keeps the switches it was started with.
    remote = library_environment(Settings(state_dir=tmp_path, ray={"address": "10.0.0.1:6379"}))
    assert not any(k.startswith("RAY_SERVE_") for k in remote)


def test_an_engine_replica_takes_several_batches_so_its_queue_is_seen_by_the_autoscaling_rule(
    tmp_path: Path,
) -> None:
    settings = Settings(state_dir=tmp_path)
    lm = resolved_model(
        name="lm", version="1", pinned_uri="models:/lm/1", flavors=["transformers"], task="text-generation"
    )
    spec = build_spec(lm, plan(replicas=1), settings)
    assert spec.engine is True
    assert spec.max_ongoing_requests == 4 * spec.max_batch_size  # 128 with the default batch of 32
    assert build_spec(model(), plan(replicas=1), settings).max_ongoing_requests == 32  # Ray's 5 collapses under load
