"""Each launcher's environment maps to the same torch.distributed/DeepSpeed variables.

The environments below are what each launcher sets for one rank (recorded from Open MPI 4.1's
mpirun here, and from the documented variables of MPICH's Hydra, Kubeflow's MPIJob,
LeaderWorkerSet and torchrun), trimmed to the variables that matter.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.dist_env import DistEnv, DistEnvError, discover

OPEN_MPI_LOCAL = {  # mpirun -np 2 on one host, rank 1
    "OMPI_COMM_WORLD_RANK": "1",
    "OMPI_COMM_WORLD_SIZE": "2",
    "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
    "OMPI_COMM_WORLD_NODE_RANK": "0",
    "OMPI_UNIVERSE_SIZE": "2",
    "PMIX_RANK": "1",
}
OPEN_MPI_TWO_HOSTS = {  # mpirun -np 4 --host a:2,b:2 -x MASTER_ADDR -x MASTER_PORT, rank 3 on host b
    "OMPI_COMM_WORLD_RANK": "3",
    "OMPI_COMM_WORLD_SIZE": "4",
    "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
    "MASTER_ADDR": "10.0.0.5",
    "MASTER_PORT": "41000",
}
MPIJOB = {  # Kubeflow MPIJob v2beta1 launcher's mpirun, rank 2 on the second worker pod
    "OMPI_COMM_WORLD_RANK": "2",
    "OMPI_COMM_WORLD_SIZE": "4",
    "OMPI_COMM_WORLD_LOCAL_RANK": "0",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
    # the operator's launcher variables, which mpirun forwards to every rank (OMPI_MCA_*)
    "OMPI_MCA_orte_default_hostfile": "/etc/mpi/hostfile",
    "OMPI_MCA_orte_keep_fqdn_hostnames": "true",
    "OMPI_MCA_plm_rsh_args": "-o ConnectionAttempts=10",
}
# What `nodewise render`'s launcher command adds: serving.mpijob_launcher read the hostfile in the
# launcher pod and mpirun passed MASTER_ADDR on (-x); the worker pods have no hostfile.
MPIJOB_RENDERED = {**MPIJOB, "MASTER_ADDR": "llama-worker-0.llama.default.svc"}
MPIJOB_HOSTFILE = "llama-worker-0.llama.default.svc slots=2\nllama-worker-1.llama.default.svc slots=2\n"
HYDRA = {"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2", "MASTER_ADDR": "node-a"}
LWS = {  # LeaderWorkerSet, size 4, worker pod 2 of group 0
    "LWS_LEADER_ADDRESS": "llama-0.llama.default",
    "LWS_GROUP_SIZE": "4",
    "LWS_WORKER_INDEX": "2",
}
TORCHRUN = {
    "RANK": "5",
    "WORLD_SIZE": "8",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "4",
    "MASTER_ADDR": "10.0.0.9",
    "MASTER_PORT": "29400",
    "TORCHELASTIC_RUN_ID": "abc",
    "GROUP_RANK": "1",
}


def read_hostfile(path: str) -> str:
    assert path == "/etc/mpi/hostfile"
    return MPIJOB_HOSTFILE


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        (OPEN_MPI_LOCAL, DistEnv("openmpi", 1, 2, 1, 2, "127.0.0.1", 29500)),
        (OPEN_MPI_TWO_HOSTS, DistEnv("openmpi", 3, 4, 1, 2, "10.0.0.5", 41000)),
        (MPIJOB, DistEnv("mpijob", 2, 4, 0, 2, "llama-worker-0.llama.default.svc", 29500)),
        (MPIJOB_RENDERED, DistEnv("mpijob", 2, 4, 0, 2, "llama-worker-0.llama.default.svc", 29500)),
        (HYDRA, DistEnv("mpich", 3, 4, 1, 2, "node-a", 29500)),
        (LWS, DistEnv("leaderworkerset", 2, 4, 0, 1, "llama-0.llama.default", 29500)),
        (TORCHRUN, DistEnv("torchrun", 5, 8, 1, 4, "10.0.0.9", 29400)),
        # Several devices per LeaderWorkerSet pod: torchrun inside the pod; its variables win over LWS_*.
        ({**LWS, **TORCHRUN}, DistEnv("torchrun", 5, 8, 1, 4, "10.0.0.9", 29400)),
    ],
    ids=[
        "openmpi-one-host",
        "openmpi-two-hosts",
        "mpijob",
        "mpijob-rendered",
        "mpich-hydra",
        "leaderworkerset",
        "torchrun",
        "torchrun-in-lws-pod",
    ],
)
def test_each_launcher_maps_to_the_same_variables(environ: dict[str, str], expected: DistEnv) -> None:
    env = discover(environ, read_hostfile)
    assert env == expected
    exports = env.exports()
    assert exports["RANK"] == str(expected.rank)
    assert exports["WORLD_SIZE"] == str(expected.world_size)
    assert exports["LOCAL_RANK"] == str(expected.local_rank)
    # The variable whose absence segfaults DeepSpeed's CPU all-reduce under plain mpirun.
    assert exports["LOCAL_SIZE"] == exports["LOCAL_WORLD_SIZE"] == str(expected.local_size)
    assert (exports["MASTER_ADDR"], exports["MASTER_PORT"]) == (expected.master_addr, str(expected.master_port))


def test_all_ranks_on_one_host_share_memory() -> None:
    assert discover(OPEN_MPI_LOCAL).all_local
    assert not discover(OPEN_MPI_TWO_HOSTS).all_local


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({}, "no launcher environment found"),
        ({**OPEN_MPI_LOCAL, "OMPI_COMM_WORLD_SIZE": "two"}, "OMPI_COMM_WORLD_SIZE='two' is not a non-negative integer"),
        (
            {k: v for k, v in OPEN_MPI_LOCAL.items() if k != "OMPI_COMM_WORLD_LOCAL_SIZE"},
            "OMPI_COMM_WORLD_LOCAL_SIZE is not set",
        ),
        ({**OPEN_MPI_LOCAL, "OMPI_COMM_WORLD_RANK": "2"}, "rank 2 is not below the world size 2"),
        (
            {**OPEN_MPI_LOCAL, "LOCAL_SIZE": "1"},
            "LOCAL_SIZE='1' is set by hand but openmpi makes this rank's local_size 2",
        ),
        ({**OPEN_MPI_LOCAL, "RANK": "0"}, "RANK='0' is set by hand but openmpi makes this rank's rank 1"),
        ({**OPEN_MPI_LOCAL, "MASTER_PORT": "80"}, "MASTER_PORT=80 is outside 1024-65535"),
        (
            {k: v for k, v in OPEN_MPI_TWO_HOSTS.items() if k != "MASTER_ADDR"},
            "MASTER_ADDR is not set and the 4 ranks span several hosts",
        ),
        ({**OPEN_MPI_TWO_HOSTS, "OMPI_COMM_WORLD_SIZE": "3", "OMPI_COMM_WORLD_RANK": "2"}, "do not split evenly"),
        ({"PMI_RANK": "0", "PMI_SIZE": "2"}, "MPI_LOCALNRANKS is not"),
        ({**LWS, "LWS_LEADER_ADDRESS": " "}, "LWS_LEADER_ADDRESS is empty"),
        ({**LWS, "LWS_WORKER_INDEX": "4"}, "rank 4 is not below the world size 4"),
        ({"RANK": "0", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x"}, "MASTER_ADDR is not"),
    ],
)
def test_missing_or_contradictory_environment_names_the_variable(environ: dict[str, str], message: str) -> None:
    with pytest.raises(DistEnvError, match=message.replace("(", r"\(").replace(")", r"\)")):
        discover(environ, read_hostfile)


def test_hostfile_problems_are_clear() -> None:
    def missing(path: str) -> str:
        raise FileNotFoundError(2, "No such file or directory")

    with pytest.raises(DistEnvError, match=r"hostfile /etc/mpi/hostfile cannot be read .*serving.mpijob_launcher"):
        discover(MPIJOB, missing)  # a worker pod, launched without nodewise's launcher entry
    assert discover(MPIJOB_RENDERED, missing).master_addr == "llama-worker-0.llama.default.svc"
    with pytest.raises(DistEnvError, match="lists no host"):
        discover(MPIJOB, lambda path: "# nothing\n\n")


def test_ranks_of_one_machine_meet_through_a_file_and_several_hosts_through_tcp(tmp_path: Path) -> None:
    from serving.dist_env import rendezvous_url

    def env(master_addr: str) -> DistEnv:
        where = {"master_addr": master_addr, "master_port": 4321}
        return DistEnv(rank=1, world_size=2, local_rank=1, local_size=2, launcher="mpirun", **where)

    assert rendezvous_url(env("127.0.0.1"), tmp_path) == f"file://{tmp_path}/rendezvous-4321"  # nothing listens
    assert rendezvous_url(env("10.0.0.5"), tmp_path) is None  # env://: the TCP store other hosts reach
