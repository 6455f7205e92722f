import json
from pathlib import Path

import pytest

from nodewise.core.errors import InvalidInventory
from tasks.planning.inventory_sources import inventory_from_k8s_nodes, inventory_from_yaml, parse_bytes, read_inventory
from tasks.planning.placement import plan_placement
from tasks.planning.profiling import load_config, profile_config

ROOT = Path(__file__).resolve().parents[2]
GIB = 1024**3


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("80GiB", 80 * GIB),
        ("81920Mi", 80 * GIB),
        ("64G", 64 * 10**9),
        ("131072Ki", 128 * 2**20),
        (1024, 1024),
        ("1.5Gi", int(1.5 * GIB)),
    ],
)
def test_sizes(text: object, value: int) -> None:
    assert parse_bytes(text, "x") == value


def test_bad_size_names_the_field() -> None:
    with pytest.raises(InvalidInventory, match=r"nodes\[0\]\.host_memory is 'lots'; give bytes or a size like 80GiB"):
        parse_bytes("lots", "nodes[0].host_memory")


def test_example_yaml_inventories() -> None:
    inv = inventory_from_yaml(ROOT / "deployments/inventory/gpu-cluster.yaml")
    assert [len(n.gpus) for n in inv.nodes] == [8, 8]
    assert inv.nodes[0].gpus[0].memory_bytes == 80 * GIB
    assert inv.device_class == "cuda"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nodes: []", "has no nodes"),
        ("hosts: []", "must have a top-level list 'nodes'"),
        ("nodes: [{name: a, cpus: 4}]", r"nodes\[0\] is missing 'host_memory'"),
        ("nodes: [{name: a, cpus: 4, host_memory: 8Gi, disks: 2}]", r"unknown keys \['disks'\]"),
        ("nodes: [{name: a, cpus: 4, host_memory: 8Gi, gpus: [{name: x}]}]", r"gpus\[0\] needs at least 'memory'"),
        ("nodes: [oops", "is not valid YAML"),
    ],
)
def test_bad_yaml_inventories(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "inv.yaml"
    path.write_text(text)
    with pytest.raises(InvalidInventory, match=message):
        inventory_from_yaml(path)


def test_unknown_source_lists_the_sources() -> None:
    with pytest.raises(InvalidInventory, match=r"inventory source 'gce' is not known; use local, nvml"):
        read_inventory("gce")


def test_kubernetes_nodes_from_gpu_feature_discovery_labels() -> None:
    nodes = json.loads((ROOT / "tests/fixtures/k8s_nodes.json").read_text())
    inv = inventory_from_k8s_nodes(nodes)
    assert [n.name for n in inv.nodes] == ["gpu-a", "gpu-shared", "cpu-a"]  # cordoned and unready skipped
    gpu_a, shared, cpu_a = inv.nodes
    assert (len(gpu_a.gpus), gpu_a.gpus[0].memory_bytes, gpu_a.cpus) == (8, 80 * GIB, 95)
    assert gpu_a.host_memory_bytes == 1056763904 * 1024
    assert shared.gpus == []  # time-sliced GPUs are not placement targets
    assert inv.unschedulable == 4
    assert (cpu_a.gpus, cpu_a.host_memory_bytes) == ([], 64 * GIB)


def test_gpu_node_without_memory_label_is_an_error() -> None:
    node = {
        "metadata": {"name": "n1", "labels": {}},
        "spec": {},
        "status": {"allocatable": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"}},
    }
    with pytest.raises(InvalidInventory, match=r"node n1 has 1 GPU\(s\) but no nvidia\.com/gpu\.memory label"):
        inventory_from_k8s_nodes([node])


def test_70b_plans_against_declared_inventories() -> None:
    profile = profile_config(
        load_config(ROOT / "benchmarks/configs/llama-2-70b.json"), dtype="bf16", seq_len=4096, device="cuda"
    )
    one_node = plan_placement(profile, inventory_from_yaml(ROOT / "deployments/inventory/gpu-cluster.yaml"))
    assert (one_node.backend, one_node.layout, one_node.tp_size) == ("ray_serve", "multi-device", 2)
    small = plan_placement(profile, inventory_from_yaml(ROOT / "deployments/inventory/small-l4-nodes.yaml"))
    assert (small.backend, small.layout) == ("deepspeed_mpi", "multi-node")
    assert small.ranks * small.budget_bytes >= profile.weight_bytes
    tiny = plan_placement(
        profile, inventory_from_k8s_nodes(json.loads((ROOT / "tests/fixtures/k8s_nodes.json").read_text())[2:3])
    )
    assert not tiny.fits
