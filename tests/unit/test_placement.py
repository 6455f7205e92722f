import pytest

from nodewise.core.errors import InvalidInventory
from serving.autotp import uneven_heads
from tasks.planning.inventory import Device, Inventory, Node
from tasks.planning.placement import plan_placement
from tasks.planning.profiling import MemoryProfile

GIB = 1024**3


def gpu_node(name: str, gpus: int, gib: int, host_gib: int = 512) -> Node:
    return Node(
        name=name,
        cpus=32,
        host_memory_bytes=host_gib * GIB,
        gpus=[Device(kind="gpu", name="A100-80GB", memory_bytes=gib * GIB) for _ in range(gpus)],
    )


def profile(weights_gib: float, heads: int | None = 32) -> MemoryProfile:
    return MemoryProfile(method="analytic", weight_bytes=int(weights_gib * GIB), attention_heads=heads)


def test_small_model_on_a_cpu_node_uses_ray_serve_with_the_desired_replicas() -> None:
    inv = Inventory(source="test", nodes=[Node(name="n", cpus=2, host_memory_bytes=16 * GIB)])
    plan = plan_placement(profile(0.01), inv, headroom_fraction=0.9, desired_replicas=2)
    assert (plan.fits, plan.backend, plan.device_kind) == (True, "ray_serve", "cpu")
    assert plan.replicas == 2
    assert plan.num_cpus_per_replica == 0.5  # half a Ray CPU: another model can share the node
    assert plan.torch_threads == 1
    assert plan.num_gpus_per_replica == 0.0
    # 16 GiB * 0.9 = 14.4 GiB usable; one copy = 0.01 GiB + 0.5 GiB runtime -> 28 copies by memory,
    # but a CPU replica under load takes a core: 2 cores hold 2 (Ray's tokens would let 4 start)
    assert int(14.4 * GIB) // (int(0.01 * GIB) + GIB // 2) == 28
    assert (plan.capacity_replicas, plan.capacity_reason) == (2, "2 core(s), one a replica")
    assert "holds 2 replica(s) (2 core(s), one a replica)" in plan.explain()


def test_a_fixed_count_past_the_cores_starts_but_the_plan_says_what_it_costs() -> None:
    inv = Inventory(source="test", nodes=[Node(name="n", cpus=2, host_memory_bytes=16 * GIB)])
    plan = plan_placement(profile(0.01), inv, headroom_fraction=0.9, desired_replicas=4)
    assert (plan.replicas, plan.capacity_replicas, plan.torch_threads) == (4, 2, 1)
    assert "4 replicas asked for on 2 core(s): they share cores" in plan.explain()
    # Ray's tokens (half a CPU each) still bound what can start at all
    assert plan_placement(profile(0.01), inv, headroom_fraction=0.9, desired_replicas=9).replicas == 4


def test_cpu_ceiling_keeps_torch_threads_times_replicas_within_the_cores() -> None:
    inv = Inventory(source="test", nodes=[Node(name="n", cpus=16, host_memory_bytes=64 * GIB)])
    plan = plan_placement(profile(0.01), inv, headroom_fraction=0.9, desired_replicas=1)
    assert plan.capacity_replicas == 16
    assert plan.replicas * plan.torch_threads <= 16
    small = Inventory(source="test", nodes=[Node(name="n", cpus=16, host_memory_bytes=4 * GIB)])
    by_memory = plan_placement(profile(0.5), small, headroom_fraction=0.9, desired_replicas=1)
    assert (by_memory.capacity_replicas, by_memory.capacity_reason) == (3, "memory for 3")


def test_several_replicas_share_one_gpu_by_fraction() -> None:
    inv = Inventory(source="test", nodes=[gpu_node("g", gpus=1, gib=80)])
    plan = plan_placement(profile(10), inv, desired_replicas=4)  # 10.5 GiB a copy, 72 GiB usable
    assert plan.layout == "shared-device"
    assert plan.capacity_replicas == 6
    assert plan.replicas == 4
    assert plan.num_gpus_per_replica == pytest.approx(1 / 6, abs=1e-3)


def test_too_big_for_one_gpu_uses_tensor_parallel_on_one_node() -> None:
    inv = Inventory(source="test", nodes=[gpu_node("g", gpus=8, gib=80)])
    plan = plan_placement(profile(130), inv)  # 130 GiB: 2 GPUs need 65 + 0.5 + 0.06 each
    assert (plan.backend, plan.layout, plan.tp_size) == ("ray_serve", "multi-device", 2)
    assert plan.num_gpus_per_replica == 2.0
    assert plan.capacity_replicas == 4


def test_tensor_parallel_respects_attention_head_divisibility() -> None:
    inv = Inventory(source="test", nodes=[gpu_node("g", gpus=8, gib=80)])
    plan = plan_placement(profile(130, heads=12), inv)  # tp=8 does not divide 12 heads
    assert plan.tp_size in (2, 4)
    assert 12 % plan.tp_size == 0


def test_placement_plans_only_rank_counts_the_ranks_accept() -> None:
    """One AutoTP rule (serving/autotp.py): 4 ranks split 48 query heads but not 6 KV heads, which
    the ranks refuse; placement skips 4 and plans 6 (it used to plan 4 from the query heads alone)."""
    inv = Inventory(source="test", nodes=[gpu_node(f"g{i}", gpus=2, gib=80) for i in range(4)])
    gqa = MemoryProfile(method="analytic", weight_bytes=200 * GIB, attention_heads=48, kv_heads=6)
    plan = plan_placement(gqa, inv)
    assert (plan.backend, plan.nodes, plan.ranks) == ("deepspeed_mpi", 3, 6)
    assert uneven_heads(4, {"num_attention_heads": 48, "num_key_value_heads": 6}) == (
        "num_key_value_heads=6, which 4 ranks cannot split evenly"
    )


def test_too_big_for_one_node_goes_multi_node_deepspeed() -> None:
    inv = Inventory(source="test", nodes=[gpu_node(f"g{i}", gpus=2, gib=80) for i in range(4)])
    plan = plan_placement(profile(200), inv)  # 2 x 72 GiB on a node is not enough
    assert (plan.backend, plan.layout) == ("deepspeed_mpi", "multi-node")
    assert (plan.nodes, plan.devices_per_node, plan.ranks) == (2, 2, 4)


def test_cpu_nodes_too_small_go_multi_node() -> None:
    inv = Inventory(source="test", nodes=[Node(name=f"c{i}", cpus=2, host_memory_bytes=2 * GIB) for i in range(2)])
    plan = plan_placement(profile(2.0), inv)
    assert (plan.backend, plan.nodes, plan.tp_size, plan.device_kind) == ("deepspeed_mpi", 2, 2, "cpu")


def test_fits_nowhere_says_so_with_numbers() -> None:
    inv = Inventory(source="test", nodes=[gpu_node("g", gpus=1, gib=24)])
    plan = plan_placement(profile(100), inv)
    assert not plan.fits
    assert plan.backend is None
    assert "fits nowhere: one copy needs 100.50 GiB; the largest device offers 21.60 GiB" in plan.explain()


def test_empty_inventory_is_a_clear_error() -> None:
    with pytest.raises(InvalidInventory, match=r"inventory from empty\.yaml has no nodes"):
        plan_placement(profile(1), Inventory(source="empty.yaml", nodes=[]))
