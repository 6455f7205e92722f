"""What the model can be placed on: nodes, their devices and memory."""

from __future__ import annotations

import os
import socket
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt

from nodewise.core.errors import InvalidInventory


class Device(BaseModel):
    """One accelerator, or the host itself for a CPU-only node."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["gpu", "cpu"]
    name: str
    memory_bytes: PositiveInt


class Node(BaseModel):
    """One machine: its devices share nothing but the host."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    cpus: PositiveInt
    host_memory_bytes: PositiveInt
    gpus: list[Device] = Field(default_factory=list)
    address: str | None = Field(default=None, description="Where mpirun reaches the node. Default: its name.")

    @property
    def host(self) -> str:
        return self.address or self.name

    @property
    def devices(self) -> list[Device]:
        """Placement targets: the GPUs, or the host memory of a CPU-only node."""
        if self.gpus:
            return self.gpus
        return [Device(kind="cpu", name="cpu", memory_bytes=self.host_memory_bytes)]


class Inventory(BaseModel):
    """All the nodes a plan may use, and where that list came from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str
    nodes: list[Node]
    unschedulable: NonNegativeInt = Field(
        default=0, description="Devices seen but not usable (shared or time-sliced GPUs)."
    )

    @property
    def device_class(self) -> str:
        """Where a profile should be measured: ``cuda`` when any node has GPUs, else ``cpu``."""
        return "cuda" if any(n.gpus for n in self.nodes) else "cpu"

    def require_nodes(self) -> Inventory:
        if not self.nodes:
            raise InvalidInventory(
                f"inventory from {self.source} has no nodes; add at least one node with cpus "
                "and host_memory_bytes (and gpus, if any)"
            )
        return self


def local_inventory(num_cpus: int | None = None, added_nodes: int = 0, added_node_cpus: int = 1) -> Inventory:
    """This machine: its host memory and CPUs, plus its GPUs as NVML reports them; and the
    ``added_nodes`` CPU nodes Ray's autoscaler may add to the local instance (on this machine)."""
    import psutil

    gpus = nvml_gpus()
    name = socket.gethostname()
    memory = psutil.virtual_memory().total
    node = Node(name=name, cpus=num_cpus or os.cpu_count() or 1, host_memory_bytes=memory, gpus=gpus)
    added = [
        Node(name=f"{name}-added-{i + 1}", cpus=added_node_cpus, host_memory_bytes=memory) for i in range(added_nodes)
    ]
    return Inventory(source="local", nodes=[node, *added])


def nvml_gpus() -> list[Device]:
    """The local GPUs through NVML; an empty list where there is no NVIDIA driver."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        devices = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total
            devices.append(Device(kind="gpu", name=str(name), memory_bytes=int(memory)))
        return devices
    finally:
        pynvml.nvmlShutdown()
