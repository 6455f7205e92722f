"""The placement decision: the smallest layout that fits with headroom.

one device (a fraction when several replicas fit) -> Ray Serve
k devices of one node, tensor parallel            -> Ray Serve, multi-device replica
several nodes                                     -> DeepSpeed over MPI, nodes x devices ranks
nowhere                                           -> a plan that says so, with the numbers
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from serving.autotp import uneven_heads
from tasks.planning.inventory import Inventory, Node
from tasks.planning.profiling import MemoryProfile

# The backends the planner chooses between (tasks/backends.py maps each name to its implementation).
RAY_SERVE: Literal["ray_serve"] = "ray_serve"  # one node: Ray Serve replicas
DEEPSPEED_MPI: Literal["deepspeed_mpi"] = "deepspeed_mpi"  # several nodes: DeepSpeed ranks under mpirun
BackendName = Literal["ray_serve", "deepspeed_mpi"]
Layout = Literal["shared-device", "one-device", "multi-device", "multi-node", "none"]


class PlacementPlan(BaseModel):
    """Where and how a model is served, and why."""

    model_config = ConfigDict(frozen=True)

    fits: bool
    backend: BackendName | None
    layout: Layout
    needed_bytes: int = Field(description="Memory one replica (or one rank) needs.")
    budget_bytes: int = Field(description="Usable memory of the device chosen (after headroom).")
    largest_budget_bytes: int
    tp_size: int = 1
    nodes: int = 1
    devices_per_node: int = 1
    replicas: int = 0
    capacity_replicas: int = 0
    capacity_reason: str = Field(default="", description="What bounds capacity_replicas (memory, cores, devices).")
    num_cpus_per_replica: float = 1.0
    num_gpus_per_replica: float = 0.0
    torch_threads: int = 1
    device_kind: Literal["cpu", "gpu"] = "cpu"
    hosts: list[str] = Field(default_factory=list, description="Multi-node plans: where each node's ranks run.")
    spare_hosts: list[str] = Field(
        default_factory=list,
        description="Multi-node plans: other nodes of the same kind that can take a node's place when it is down.",
    )
    reasons: list[str] = Field(default_factory=list)
    kv_tokens: int = Field(
        default=0,
        description="Causal LMs: tokens of KV cache the profile counted per copy; the generation engine "
        "holds at most this many tokens (prompts plus new tokens) at once.",
    )

    @property
    def ranks(self) -> int:
        return self.nodes * self.devices_per_node

    def explain(self) -> str:
        """A short human-readable account of the decision."""
        return "; ".join(self.reasons)


def plan_placement(
    profile: MemoryProfile,
    inventory: Inventory,
    *,
    headroom_fraction: float = 0.9,
    desired_replicas: int = 2,
) -> PlacementPlan:
    """Choose the smallest layout of ``inventory`` that holds ``profile`` with headroom."""
    plan = _choose(profile, inventory, headroom_fraction, desired_replicas)
    return plan.model_copy(update={"kv_tokens": profile.kv_tokens})


def _choose(
    profile: MemoryProfile, inventory: Inventory, headroom_fraction: float, desired_replicas: int
) -> PlacementPlan:
    inventory.require_nodes()
    budgets = [(node, int(d.memory_bytes * headroom_fraction)) for node in inventory.nodes for d in node.devices]
    largest = max(b for _, b in budgets)
    need = profile.total_bytes
    if need <= largest:
        return _single_device(profile, inventory, headroom_fraction, desired_replicas, largest)
    for node in sorted(inventory.nodes, key=lambda n: -len(n.gpus)):
        plan = _multi_device(profile, node, headroom_fraction, largest)
        if plan is not None:
            return plan
    plan = _multi_node(profile, inventory, headroom_fraction, largest)
    if plan is not None:
        return plan
    most = sum(int(d.memory_bytes * headroom_fraction) for n in inventory.nodes for d in n.devices)
    return PlacementPlan(
        fits=False,
        backend=None,
        layout="none",
        needed_bytes=need,
        budget_bytes=0,
        largest_budget_bytes=largest,
        reasons=[
            f"fits nowhere: one copy needs {_gib(need)}; the largest device offers "
            f"{_gib(largest)} and all {sum(len(n.devices) for n in inventory.nodes)} devices "
            f"together {_gib(most)} (at {headroom_fraction:.0%} headroom)",
            "add devices or nodes with more memory, or lower the dtype (e.g. bf16, int8)",
        ],
    )


def _single_device(
    profile: MemoryProfile, inventory: Inventory, headroom: float, desired: int, largest: int
) -> PlacementPlan:
    need = profile.total_bytes
    gpu_nodes = [n for n in inventory.nodes if n.gpus]
    kind: Literal["cpu", "gpu"] = "gpu" if gpu_nodes else "cpu"
    nodes = gpu_nodes or inventory.nodes
    per_device = {id(n): [int(d.memory_bytes * headroom) // need for d in n.devices] for n in nodes}
    capacity = sum(sum(fits) for fits in per_device.values())
    # Ray CPUs are scheduling tokens: reserving half a core per replica lets a second model
    # share the node (FACTS: with 1 CPU each, two replicas fill a 2-core machine). Torch threads
    # follow the cores each replica really has.
    cpu_share = 0.5 if kind == "cpu" else 1.0
    cpus = sum(n.cpus for n in nodes)
    capacity_reason = f"memory for {capacity}"
    startable = capacity  # what a fixed count asked for may start
    if kind == "cpu":
        startable = min(capacity, sum(int(n.cpus / cpu_share) for n in nodes))  # Ray's CPU tokens
        if cpus < capacity:
            # A CPU replica under load keeps one core busy on its own (its request path is one Python
            # thread: serve_throughput.py's CPU per process), so autoscaling stops at one a core: more
            # only take cores from busy ones (measured: 3 or 4 on 2 cores serve less than 2).
            capacity, capacity_reason = cpus, f"{cpus} core(s), one a replica"
    replicas = max(1, min(desired, startable))
    threads = max(1, min(8, cpus // replicas))
    per_gpu = max(max(v) for v in per_device.values())
    num_gpus = 0.0 if kind == "cpu" else (1.0 if per_gpu <= 1 else round(1.0 / min(per_gpu, 8), 3))
    layout: Layout = "shared-device" if per_gpu > 1 else "one-device"
    budget = int(nodes[0].devices[0].memory_bytes * headroom)
    where = "host memory" if kind == "cpu" else f"one {nodes[0].gpus[0].name}"
    reasons = [
        f"one copy needs {_gib(need)} ({profile.method}: weights {_gib(profile.weight_bytes)}, "
        f"kv cache {_gib(profile.kv_cache_bytes)}, activations {_gib(profile.activation_bytes)}, "
        f"runtime {_gib(profile.runtime_bytes)}), which fits {where} ({_gib(budget)} usable)",
        f"the inventory holds {capacity} replica(s) ({capacity_reason}); serving {replicas} with Ray Serve",
    ]
    if replicas > capacity:  # a fixed count asked for more than the cores: started, but said
        reasons.append(
            f"{replicas} replicas asked for on {cpus} core(s): they share cores, and under load serve less "
            f"than {capacity} would"
        )
    if num_gpus and num_gpus < 1:
        reasons.append(f"{per_gpu} replicas fit one GPU: each asks for num_gpus={num_gpus}")
    return PlacementPlan(
        fits=True,
        backend=RAY_SERVE,
        layout=layout,
        needed_bytes=need,
        budget_bytes=budget,
        largest_budget_bytes=largest,
        replicas=replicas,
        capacity_replicas=capacity,
        capacity_reason=capacity_reason,
        num_cpus_per_replica=cpu_share,
        num_gpus_per_replica=num_gpus,
        torch_threads=threads,
        device_kind=kind,
        reasons=reasons,
    )


def _tp_candidates(profile: MemoryProfile, limit: int) -> list[int]:
    sizes = [k for k in (2, 4, 8, 16, 32, 64) if k <= limit]
    return [k for k in sizes if _splits(profile, k)]


def _splits(profile: MemoryProfile, tp: int) -> bool:
    """Whether ``tp`` ranks split the model's heads evenly (serving/autotp.py, as the ranks check)."""
    return (
        uneven_heads(tp, {"num_attention_heads": profile.attention_heads, "num_key_value_heads": profile.kv_heads})
        is None
    )


def _multi_device(profile: MemoryProfile, node: Node, headroom: float, largest: int) -> PlacementPlan | None:
    if len(node.gpus) < 2:
        return None
    budget = int(min(g.memory_bytes for g in node.gpus) * headroom)
    for tp in _tp_candidates(profile, len(node.gpus)):
        need = profile.per_rank_bytes(tp)
        if need <= budget:
            return PlacementPlan(
                fits=True,
                backend=RAY_SERVE,
                layout="multi-device",
                needed_bytes=need,
                budget_bytes=budget,
                largest_budget_bytes=largest,
                tp_size=tp,
                devices_per_node=tp,
                replicas=1,
                capacity_replicas=len(node.gpus) // tp,
                capacity_reason=f"{len(node.gpus)} devices, {tp} a replica",
                num_gpus_per_replica=float(tp),
                num_cpus_per_replica=1.0,
                device_kind="gpu",
                reasons=[
                    f"one copy needs {_gib(profile.total_bytes)}, more than one GPU's "
                    f"{_gib(budget)}; tensor parallel over {tp} GPUs of node {node.name} "
                    f"needs {_gib(need)} per GPU",
                    f"served by Ray Serve with a {tp}-GPU replica; {len(node.gpus) // tp} such replica(s) fit the node",
                ],
            )
    return None


def _multi_node(profile: MemoryProfile, inventory: Inventory, headroom: float, largest: int) -> PlacementPlan | None:
    # Homogeneous groups only: ranks on the weakest node of the group bound the shard size.
    by_devices = sorted(inventory.nodes, key=lambda n: (-len(n.devices), -n.devices[0].memory_bytes))
    per_node = len(by_devices[0].devices)
    group = [n for n in by_devices if len(n.devices) == per_node]
    for count in range(2, len(group) + 1):
        tp = count * per_node
        if not _splits(profile, tp):
            continue
        budget = int(min(d.memory_bytes for n in group[:count] for d in n.devices) * headroom)
        need = profile.per_rank_bytes(tp)
        if need <= budget and _host_memory_ok(group[:count], need):
            kind: Literal["cpu", "gpu"] = "gpu" if group[0].gpus else "cpu"
            spares = [n for n in group[count:] if min(d.memory_bytes for d in n.devices) * headroom >= need]
            standby = (
                [f"spare node(s) {', '.join(n.name for n in spares)}: a restart puts a dead node's ranks there"]
                if spares
                else []
            )
            return PlacementPlan(
                fits=True,
                backend=DEEPSPEED_MPI,
                layout="multi-node",
                needed_bytes=need,
                budget_bytes=budget,
                largest_budget_bytes=largest,
                tp_size=tp,
                nodes=count,
                devices_per_node=per_node,
                replicas=1,
                capacity_replicas=len(group) // count,
                num_gpus_per_replica=float(per_node) if kind == "gpu" else 0.0,
                device_kind=kind,
                hosts=[n.host for n in group[:count]],
                spare_hosts=[n.host for n in spares],
                torch_threads=max(1, min(8, min(n.cpus for n in group[:count]) // per_node)),
                reasons=[
                    f"one copy needs {_gib(profile.total_bytes)}; no single node holds it",
                    f"{count} nodes x {per_node} device(s) = {tp} tensor-parallel ranks at "
                    f"{_gib(need)} each ({_gib(budget)} usable per device)",
                    "served by DeepSpeed over MPI: every rank takes part in every request",
                    *standby,
                ],
            )
    return None


def _host_memory_ok(nodes: list[Node], per_rank: int) -> bool:
    # Loading stages one shard per rank through host memory.
    return all(n.host_memory_bytes >= per_rank * len(n.devices) for n in nodes)


def _gib(value: int) -> str:
    """Bytes for people: GiB from 1 GiB up, MiB below."""
    if value >= 1024**3:
        return f"{value / 1024**3:.2f} GiB"
    return f"{value / 1024**2:.1f} MiB"
