"""Inventory sources: a declarative YAML file, Kubernetes node labels (GPU Feature Discovery),
a Ray cluster (memory read by NVML inside a task on each node), or this machine (NVML)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from nodewise.core.errors import InvalidInventory
from tasks.planning.inventory import Device, Inventory, Node, local_inventory

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_QUANTITY = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgtKMGT]i?)?[bB]?\s*$")


def parse_bytes(value: Any, what: str) -> int:
    """``80GiB``, ``81920Mi``, ``64G``, ``131072Ki`` or a plain number of bytes."""
    if isinstance(value, bool):
        raise InvalidInventory(f"{what} is {value!r}; give bytes or a size like 80GiB")
    if isinstance(value, int | float):
        return int(value)
    match = _QUANTITY.match(str(value))
    if match is None:
        raise InvalidInventory(f"{what} is {value!r}; give bytes or a size like 80GiB, 81920Mi, 64G")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "").lower()])


def parse_cpus(value: Any, what: str) -> int:
    """CPUs: an integer, or a Kubernetes quantity such as ``16`` or ``15500m``."""
    text = str(value).strip()
    try:
        cpus = int(text[:-1]) // 1000 if text.endswith("m") else int(float(text))
    except ValueError as e:
        raise InvalidInventory(f"{what} is {value!r}; give a number of CPUs like 16") from e
    return max(cpus, 1)


def inventory_from_yaml(path: str | Path) -> Inventory:
    """Read a declared inventory::

    nodes:
      - name: gpu-a
        cpus: 32
        host_memory: 512GiB
        gpus: [{name: A100-80GB, memory: 80GiB, count: 8}]
      - {name: cpu-a, cpus: 16, host_memory: 64GiB, address: 10.0.0.7}

    ``address`` is where mpirun reaches the node (default: its name); ``localhost`` runs that
    node's ranks on this machine.
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError as e:
        raise InvalidInventory(f"inventory file {path} does not exist") from e
    except yaml.YAMLError as e:
        raise InvalidInventory(f"inventory file {path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), list):
        raise InvalidInventory(f"inventory file {path} must have a top-level list 'nodes'")
    nodes = [_yaml_node(entry, i, path) for i, entry in enumerate(data["nodes"])]
    return Inventory(source=str(path), nodes=nodes).require_nodes()


def _yaml_node(entry: Any, index: int, path: Path) -> Node:
    where = f"{path}: nodes[{index}]"
    if not isinstance(entry, dict):
        raise InvalidInventory(f"{where} must be a mapping with name, cpus, host_memory (and gpus)")
    unknown = set(entry) - {"name", "cpus", "host_memory", "gpus", "address"}
    if unknown:
        raise InvalidInventory(
            f"{where} has unknown keys {sorted(unknown)}; use name, cpus, host_memory, gpus, address"
        )
    for key in ("cpus", "host_memory"):
        if key not in entry:
            raise InvalidInventory(f"{where} is missing {key!r}")
    gpus = []
    for j, gpu in enumerate(entry.get("gpus") or []):
        if not isinstance(gpu, dict) or "memory" not in gpu:
            raise InvalidInventory(f"{where}.gpus[{j}] needs at least 'memory' (e.g. 80GiB)")
        memory = parse_bytes(gpu["memory"], f"{where}.gpus[{j}].memory")
        count = int(gpu.get("count", 1))
        gpus += [Device(kind="gpu", name=str(gpu.get("name", "gpu")), memory_bytes=memory)] * count
    return Node(
        name=str(entry.get("name", f"node-{index}")),
        cpus=parse_cpus(entry["cpus"], f"{where}.cpus"),
        host_memory_bytes=parse_bytes(entry["host_memory"], f"{where}.host_memory"),
        gpus=gpus,
        address=str(entry["address"]) if entry.get("address") else None,
    )


def inventory_from_k8s_nodes(nodes: list[dict[str, Any]], source: str = "k8s") -> Inventory:
    """Nodes as the Kubernetes API returns them (dicts), read through GPU Feature Discovery labels.

    Shared or time-sliced GPUs (``-SHARED`` products, ``nvidia.com/gpu.replicas`` > 1) are
    counted as unschedulable, not offered as placement targets. Unready or cordoned nodes are skipped.
    """
    result, unschedulable = [], 0
    for node in nodes:
        meta, spec, status = node.get("metadata", {}), node.get("spec", {}), node.get("status", {})
        if spec.get("unschedulable") or not _ready(status):
            continue
        labels = meta.get("labels") or {}
        allocatable = status.get("allocatable") or status.get("capacity") or {}
        count = int(allocatable.get("nvidia.com/gpu", 0) or 0)
        product = labels.get("nvidia.com/gpu.product", "gpu")
        shared = product.endswith("-SHARED") or int(labels.get("nvidia.com/gpu.replicas", "1") or 1) > 1
        gpus: list[Device] = []
        if count and shared:
            unschedulable += count
        elif count:
            if "nvidia.com/gpu.memory" not in labels:
                raise InvalidInventory(
                    f"node {meta.get('name')} has {count} GPU(s) but no nvidia.com/gpu.memory label; "
                    "install GPU Feature Discovery or declare the node in a YAML inventory"
                )
            memory = int(labels["nvidia.com/gpu.memory"]) * 2**20  # GFD reports MiB per GPU
            gpus = [Device(kind="gpu", name=product, memory_bytes=memory)] * count
        result.append(
            Node(
                name=meta.get("name", "node"),
                cpus=parse_cpus(allocatable.get("cpu", 1), "cpu"),
                host_memory_bytes=parse_bytes(allocatable.get("memory", 0), "memory") or 1,
                gpus=gpus,
            )
        )
    return Inventory(source=source, nodes=result, unschedulable=unschedulable)


def _ready(status: dict[str, Any]) -> bool:
    conditions = status.get("conditions") or []
    return all(c.get("status") == "True" for c in conditions if c.get("type") == "Ready")


def k8s_inventory() -> Inventory:
    """Read nodes through the Kubernetes API (kubeconfig, or in-cluster config)."""
    from kubernetes import client

    from nodewise.core.errors import KubernetesUnavailable
    from tasks.kubeapi import api_client

    try:
        api = client.CoreV1Api(api_client())
    except KubernetesUnavailable as e:
        raise InvalidInventory(f"--inventory k8s: {e}") from e
    nodes = api.api_client.sanitize_for_serialization(api.list_node().items)
    return inventory_from_k8s_nodes(nodes, source=f"k8s:{api.api_client.configuration.host}")


def _node_facts() -> dict[str, Any]:
    """Runs on each Ray node: CPUs, host memory and NVML GPUs as seen there."""
    import os

    import psutil

    from tasks.planning.inventory import nvml_gpus

    return {
        "cpus": os.cpu_count() or 1,
        "host_memory_bytes": psutil.virtual_memory().total,
        "gpus": [g.model_dump() for g in nvml_gpus()],
    }


def ray_inventory(address: str | None = None) -> Inventory:
    """Nodes of a Ray cluster; GPU memory read by NVML in a task pinned to each node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not ray.is_initialized():
        ray.init(address=address or "auto", logging_level="ERROR", log_to_driver=False)
    facts = ray.remote(num_cpus=0)(_node_facts)
    alive = [n for n in ray.nodes() if n.get("Alive")]
    refs = [
        facts.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
        for n in alive
    ]
    nodes = []
    for node, seen in zip(alive, ray.get(refs, timeout=120), strict=True):
        cpus = int(node["Resources"].get("CPU", seen["cpus"]))
        gpus = [Device(**g) for g in seen["gpus"]][: int(node["Resources"].get("GPU", 0))]
        nodes.append(
            Node(
                name=node["NodeManagerAddress"] + ":" + node["NodeID"][:8],
                cpus=max(cpus, 1),
                host_memory_bytes=seen["host_memory_bytes"],
                gpus=gpus,
            )
        )
    return Inventory(source=f"ray:{address or 'auto'}", nodes=nodes)


def read_inventory(
    source: str, num_cpus: int | None = None, added_nodes: int = 0, added_node_cpus: int = 1
) -> Inventory:
    """``local``, ``nvml``, ``ray[:ADDRESS]``, ``k8s``, or a YAML file path. ``local`` counts the
    nodes Ray's autoscaler may add to the local instance (``ray.max_added_nodes``)."""
    if source in ("local", "nvml"):
        inventory = local_inventory(num_cpus, added_nodes, added_node_cpus)
        if source == "nvml" and not inventory.nodes[0].gpus:
            raise InvalidInventory("NVML found no NVIDIA GPU here; use --inventory local, a YAML file, ray or k8s")
        return inventory
    if source == "ray" or source.startswith("ray:"):
        return ray_inventory(source.partition(":")[2] or None)
    if source == "k8s":
        return k8s_inventory()
    if source.endswith((".yaml", ".yml")) or Path(source).exists():
        return inventory_from_yaml(source)
    raise InvalidInventory(
        f"inventory source {source!r} is not known; use local, nvml, ray[:ADDRESS], k8s or a YAML file path"
    )
