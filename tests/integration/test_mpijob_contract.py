"""The rendered MPIJob's launcher command, run as the MPI Operator would run it, starts ranks on
separate hosts that derive the right distributed environment.

No cluster runs here. What kubeflow/mpi-operator v2beta1 gives the launcher pod is recorded from
its source (pkg/controller/mpi_job_controller.go): ``OMPI_MCA_orte_default_hostfile`` naming a
hostfile of ``HOST slots=N`` lines (mounted in the launcher only), ``OMPI_MCA_orte_keep_fqdn_hostnames``
and ``OMPI_MCA_plm_rsh_args``. The hosts are network namespaces (testkit/hosts.py) and mpirun reaches
them through the remote-shell agent instead of the operator's ssh (benchmarks/image_run.py runs the
same command from the image over real sshd). The command is the rendered one, unchanged except
the program each rank runs: a probe that derives its environment with serving.dist_env, meets
the others over gloo and all-reduces.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodewise.core.settings import KubernetesSettings
from serving.spec import DeepSpeedSpec
from tasks.k8s.render import render
from tasks.planning.inventory import Inventory, Node
from tasks.planning.placement import plan_placement
from tasks.planning.profiling import MemoryProfile
from testkit import hosts as netns

pytestmark = pytest.mark.multihost
ROOT = Path(__file__).resolve().parents[2]
GIB = 2**30


@pytest.fixture(scope="module")
def lan() -> Iterator[netns.Hosts]:
    if not netns.available():
        pytest.skip(netns.why_unavailable())
    with netns.hosts(2) as made:
        yield made


def rendered_launcher() -> tuple[list[str], int]:
    nodes = [Node(name=f"n{i}", cpus=2, host_memory_bytes=6 * GIB) for i in range(2)]
    plan = plan_placement(MemoryProfile(method="analytic", weight_bytes=8 * GIB), Inventory(source="t", nodes=nodes))
    assert (plan.backend, plan.nodes, plan.devices_per_node) == ("deepspeed_mpi", 2, 1)
    spec = DeepSpeedSpec(
        app_name="llama",
        model_uri="models:/llama/1",
        model_name="llama",
        model_version="1",
        tracking_uri="http://mlflow.mlops:5000",
        registry_uri="http://mlflow.mlops:5000",
        flavor="transformers",
        tp_size=plan.ranks,
    )
    [job] = [o for o in render(spec, plan, KubernetesSettings(), multi_node="mpijob") if o["kind"] == "MPIJob"]
    launcher = job["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]
    return launcher["command"], job["spec"]["slotsPerWorker"]


def test_the_rendered_launcher_command_starts_ranks_that_find_rank_0(lan: netns.Hosts, tmp_path: Path) -> None:
    command, slots = rendered_launcher()
    tail = ["-m", "serving.deepspeed_worker", "/etc/nodewise/spec.json"]
    assert command[-3:] == tail
    # the image's `python` is this venv's; each rank runs the probe instead of the server
    argv = [sys.executable if part == "python" else part for part in command[:-3]]
    argv += ["-m", "tests.integration._mpijob_rank", str(tmp_path)]
    hostfile = tmp_path / "hostfile"  # the operator writes pod DNS names; the hosts here are addresses
    hostfile.write_text("".join(f"{h.address} slots={slots}\n" for h in lan.hosts))
    operator_env = {
        "OMPI_MCA_orte_keep_fqdn_hostnames": "true",
        "OMPI_MCA_orte_default_hostfile": str(hostfile),
        "OMPI_MCA_plm_rsh_args": "-o ConnectionAttempts=10",
    }
    here = {  # this machine's stand-ins for ssh and the pod network, as MCA variables
        "OMPI_MCA_plm_rsh_agent": str(lan.agent),
        "OMPI_MCA_oob_tcp_if_include": lan.subnet,
        "OMPI_MCA_btl_tcp_if_include": lan.subnet,
        "OMPI_MCA_btl": "self,tcp",
        # orted's hwloc shared segment crashed here once in a CI run (a segfault in
        # hwloc_shmem_topology_write, address-space dependent; benchmarks' history, session 7):
        # nodewise's own remote launches skip it the same way
        "OMPI_MCA_rtc_hwloc_vmhole": "none",
    }
    clean = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    done = subprocess.run(
        argv, env={**clean, **operator_env, **here}, cwd=ROOT, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"rank 0 on {lan[0].address}" in done.stderr  # read from the hostfile, in the launcher
    ranks = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank-*.json"))]
    assert [r["rank"] for r in ranks] == [0, 1]
    for record, host in zip(ranks, lan.hosts, strict=True):
        assert record["launcher"] == "mpijob"
        assert (record["world_size"], record["local_size"]) == (2, 1)
        assert record["master_addr"] == lan[0].address
        assert record["master_addr_given"] == lan[0].address  # from the launcher: no hostfile read on workers
        assert record["address"] == host.address  # each rank on its own host
        assert record["sum"] == 3  # 1 + 2: the ranks met over the network
