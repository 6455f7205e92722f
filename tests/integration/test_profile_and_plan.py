"""Profiling real registered models on CPU and planning them against declared inventories."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nodewise.core.errors import DoesNotFit
from nodewise.core.settings import Settings
from tasks.planning import profile_models
from tasks.planning.profile_models import cache_key, profile_registered
from tasks.planning.registry import make_client, resolve_model
from tasks.records import load_records
from tasks.steps import profile_model_task
from testkit.flows import deploy_model

ROOT = Path(__file__).resolve().parents[2]


def resolved(settings: Settings, uri: str):
    return resolve_model(uri, make_client(settings.tracking_uri, settings.registry_uri))


def test_analytic_and_measured_profile_of_a_registered_torch_model(settings: Settings, digits_model: str) -> None:
    model = resolved(settings, digits_model)
    profile = profile_registered(model, batch_size=32)
    assert profile.method == "analytic+measured"
    assert profile.param_count == 64 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10
    assert profile.weight_bytes == profile.param_count * 4
    assert profile.activation_bytes == 32 * (128 + 128) * 4  # the first ReLU's input and output
    assert profile.measured_bytes is not None
    assert profile.measured_bytes >= 0


def test_profile_is_cached_on_the_model_version(
    settings: Settings, digits_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = resolved(settings, digits_model)
    first = profile_model_task.fn(model, batch_size=4, device="cpu")
    again = resolved(settings, digits_model)
    assert cache_key(None, 4, "cpu") in again.tags

    def no_second_measurement(*args: object, **kwargs: object) -> None:
        raise AssertionError("a profiled version must not be measured again")

    monkeypatch.setattr(profile_models, "measure", no_second_measurement)
    assert profile_model_task.fn(again, batch_size=4, device="cpu") == first


def test_a_model_that_fits_nowhere_is_not_deployed(settings: Settings, digits_model: str, tmp_path: Path) -> None:
    from ray import serve

    tiny = tmp_path / "tiny.yaml"
    tiny.write_text("nodes: [{name: pi, cpus: 1, host_memory: 300Mi}]\n")
    before = load_records(settings.state.records)
    with pytest.raises(DoesNotFit, match=r"was not deployed: fits nowhere: one copy needs 5\d\d\.\d MiB; the largest"):
        deploy_model(digits_model, inventory=str(tiny), settings=settings)
    assert load_records(settings.state.records) == before
    import ray

    if ray.is_initialized():
        assert "nodewise-digits" not in serve.status().applications or before


def test_profile_command_on_a_config_and_an_inventory(settings: Settings) -> None:
    nodewise = str(Path(sys.executable).with_name("nodewise"))
    done = subprocess.run(
        [
            nodewise,
            "profile",
            str(ROOT / "benchmarks/configs/llama-2-70b.json"),
            "--dtype",
            "bf16",
            "--inventory",
            str(ROOT / "deployments/inventory/small-l4-nodes.yaml"),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["param_count"] == 68_976_648_192
    assert result["plan"]["backend"] == "deepspeed_mpi"
    bad = subprocess.run(
        [nodewise, "profile", str(ROOT / "benchmarks/configs/gpt2.json"), "--dtype", "fp12"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: unknown dtype 'fp12'")
    assert "Traceback" not in bad.stderr


def test_inventory_from_a_real_ray_cluster(settings: Settings) -> None:
    from tasks.planning.inventory_sources import read_inventory
    from tasks.rayserve.cluster import connect, ensure_cluster

    cluster = ensure_cluster(settings)
    connect(cluster)
    inventory = read_inventory(f"ray:{cluster.address}")
    [node] = inventory.nodes  # one local node: CPUs from Ray, host memory read on the node itself
    assert node.cpus == settings.ray.num_cpus
    assert node.host_memory_bytes > 1024**3
    assert node.gpus == []  # no GPU here: NVML finds none, and Ray reports none
    assert inventory.device_class == "cpu"
