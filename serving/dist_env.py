"""The distributed environment of one rank, derived from whatever launched it.

torch.distributed and DeepSpeed want RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT;
DeepSpeed's CPU all-reduce also reads LOCAL_SIZE and segfaults without it under plain mpirun.
Launchers set other names. ``discover`` reads them (Open MPI, MPICH/Hydra, a Kubeflow MPIJob's
hostfile, LeaderWorkerSet, torchrun) and ``DistEnv.exports`` gives the variables to set, so no
one sets them by hand. A missing or contradictory environment is a ``DistEnvError`` naming the
variable, never a hang or a crash later.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MASTER_PORT = 29500
# Where Open MPI (4.x, 5.x) is told its hostfile; a Kubeflow MPIJob sets the first in its launcher.
HOSTFILE_VARIABLES = ("OMPI_MCA_orte_default_hostfile", "PRTE_MCA_prte_default_hostfile")
_LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


class DistEnvError(ValueError):
    """The launcher's environment is missing something or contradicts itself."""


@dataclass(frozen=True)
class DistEnv:
    """Where one rank stands in the job."""

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    local_size: int
    master_addr: str
    master_port: int

    @property
    def all_local(self) -> bool:
        """Every rank on this host (DeepSpeed then all-reduces through shared memory)."""
        return self.local_size == self.world_size

    def exports(self) -> dict[str, str]:
        """The variables torch.distributed and DeepSpeed read."""
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_SIZE": str(self.local_size),
            "LOCAL_WORLD_SIZE": str(self.local_size),
            "CROSS_RANK": str(self.rank // self.local_size),
            "CROSS_SIZE": str(max(1, self.world_size // self.local_size)),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def discover(environ: Mapping[str, str], read_text: Callable[[str], str] | None = None) -> DistEnv:
    """The rank's environment from its launcher's variables.

    Raises:
        DistEnvError: no known launcher, a variable that is not a number, values that
            contradict each other, or a multi-host job with no way to find rank 0's host.
    """
    read_text = read_text or (lambda p: Path(p).read_text())
    if "OMPI_COMM_WORLD_RANK" in environ:
        env = _open_mpi(environ, read_text)
    elif "PMI_RANK" in environ:
        env = _hydra(environ, read_text)
    elif "TORCHELASTIC_RUN_ID" in environ:  # torchrun, also inside a LeaderWorkerSet pod with several devices
        env = _torchrun(environ)
    elif "LWS_LEADER_ADDRESS" in environ:
        env = _leader_worker_set(environ)
    elif {"RANK", "WORLD_SIZE", "MASTER_ADDR"} <= set(environ):
        env = _torchrun(environ)
    else:
        raise DistEnvError(
            "no launcher environment found (none of OMPI_COMM_WORLD_RANK, PMI_RANK, LWS_LEADER_ADDRESS, "
            "RANK/WORLD_SIZE/MASTER_ADDR); start the worker under mpirun, torchrun, an MPIJob or a "
            "LeaderWorkerSet, or let `nodewise deploy` launch it"
        )
    _check(env)
    _check_preset(environ, env)
    return env


def _open_mpi(environ: Mapping[str, str], read_text: Callable[[str], str]) -> DistEnv:
    world = _int(environ, "OMPI_COMM_WORLD_SIZE")
    local_size = _int(environ, "OMPI_COMM_WORLD_LOCAL_SIZE")
    hostfile = next((environ[name] for name in HOSTFILE_VARIABLES if environ.get(name)), None)
    launcher = "mpijob" if hostfile and HOSTFILE_VARIABLES[0] in environ else "openmpi"
    return DistEnv(
        launcher=launcher,
        rank=_int(environ, "OMPI_COMM_WORLD_RANK"),
        world_size=world,
        local_rank=_int(environ, "OMPI_COMM_WORLD_LOCAL_RANK"),
        local_size=local_size,
        master_addr=_master_addr(environ, world, local_size, hostfile, read_text, "mpirun -x MASTER_ADDR=HOST"),
        master_port=_port(environ),
    )


def _hydra(environ: Mapping[str, str], read_text: Callable[[str], str]) -> DistEnv:
    world = _int(environ, "PMI_SIZE")
    if "MPI_LOCALNRANKS" not in environ:
        raise DistEnvError(
            "PMI_RANK is set but MPI_LOCALNRANKS is not: this PMI launcher is not MPICH's Hydra; "
            "use mpiexec.hydra, or Open MPI's mpirun"
        )
    local_size = _int(environ, "MPI_LOCALNRANKS")
    return DistEnv(
        launcher="mpich",
        rank=_int(environ, "PMI_RANK"),
        world_size=world,
        local_rank=_int(environ, "MPI_LOCALRANKID"),
        local_size=local_size,
        master_addr=_master_addr(
            environ, world, local_size, environ.get("HYDRA_HOST_FILE"), read_text, "mpiexec -genv MASTER_ADDR HOST"
        ),
        master_port=_port(environ),
    )


def _leader_worker_set(environ: Mapping[str, str]) -> DistEnv:
    # One rank per pod: the pod's index in the group is its rank; the leader (index 0) is rank 0.
    leader = environ["LWS_LEADER_ADDRESS"].strip()
    if not leader:
        raise DistEnvError("LWS_LEADER_ADDRESS is empty; LeaderWorkerSet sets it to the leader pod's address")
    return DistEnv(
        launcher="leaderworkerset",
        rank=_int(environ, "LWS_WORKER_INDEX"),
        world_size=_int(environ, "LWS_GROUP_SIZE"),
        local_rank=0,
        local_size=1,
        master_addr=leader,
        master_port=_port(environ),
    )


def _torchrun(environ: Mapping[str, str]) -> DistEnv:
    world = _int(environ, "WORLD_SIZE")
    if "MASTER_ADDR" not in environ:
        raise DistEnvError("RANK and WORLD_SIZE are set but MASTER_ADDR is not; set it to rank 0's host")
    local_size = _int(environ, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in environ else world
    return DistEnv(
        launcher="torchrun",
        rank=_int(environ, "RANK"),
        world_size=world,
        local_rank=_int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else 0,
        local_size=local_size,
        master_addr=environ["MASTER_ADDR"],
        master_port=_port(environ),
    )


def _master_addr(
    environ: Mapping[str, str],
    world: int,
    local_size: int,
    hostfile: str | None,
    read_text: Callable[[str], str],
    how: str,
) -> str:
    if environ.get("MASTER_ADDR", "").strip():
        return environ["MASTER_ADDR"].strip()
    if hostfile:
        return first_host(hostfile, read_text)
    if local_size == world:
        return "127.0.0.1"
    raise DistEnvError(
        f"MASTER_ADDR is not set and the {world} ranks span several hosts, so rank 0's host is unknown; "
        f"pass it ({how}) or a hostfile, or let `nodewise deploy` launch the job"
    )


def first_host(hostfile: str, read_text: Callable[[str], str] | None = None) -> str:
    """Rank 0's host: the first host of the hostfile (ranks are placed by slot, in file order)."""
    try:
        text = (read_text or (lambda p: Path(p).read_text()))(hostfile)
    except OSError as e:
        raise DistEnvError(
            f"hostfile {hostfile} cannot be read ({e.strerror}); an MPIJob mounts it in the launcher only, "
            "so start mpirun through `python -m serving.mpijob_launcher` (it passes MASTER_ADDR on, as "
            "`nodewise render` does) or set MASTER_ADDR"
        ) from e
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            return line.split()[0].split(":")[0]
    raise DistEnvError(f"hostfile {hostfile} lists no host; write one 'HOST slots=N' line per node")


def _int(environ: Mapping[str, str], name: str) -> int:
    if name not in environ:
        raise DistEnvError(f"{name} is not set; the launcher sets it for every rank")
    value = environ[name].strip()
    if not value.isdigit():
        raise DistEnvError(f"{name}={environ[name]!r} is not a non-negative integer")
    return int(value)


def _port(environ: Mapping[str, str]) -> int:
    if "MASTER_PORT" not in environ:
        return DEFAULT_MASTER_PORT
    port = _int(environ, "MASTER_PORT")
    if not 1024 <= port <= 65535:
        raise DistEnvError(f"MASTER_PORT={port} is outside 1024-65535; pick a free port in that range")
    return port


def _check(env: DistEnv) -> None:
    if env.world_size < 1:
        raise DistEnvError(f"world size is {env.world_size} ({env.launcher}); it must be at least 1")
    if env.rank >= env.world_size:
        raise DistEnvError(f"rank {env.rank} is not below the world size {env.world_size} ({env.launcher})")
    if not 1 <= env.local_size <= env.world_size:
        raise DistEnvError(
            f"local size {env.local_size} must be between 1 and the world size {env.world_size} ({env.launcher})"
        )
    if env.local_rank >= env.local_size:
        raise DistEnvError(f"local rank {env.local_rank} is not below the local size {env.local_size}")
    if env.world_size % env.local_size:
        raise DistEnvError(
            f"{env.world_size} ranks do not split evenly into {env.local_size} per host; "
            "give every host the same number of ranks (slots)"
        )


_PRESET = {"RANK": "rank", "WORLD_SIZE": "world_size", "LOCAL_RANK": "local_rank", "LOCAL_SIZE": "local_size"}


def _check_preset(environ: Mapping[str, str], env: DistEnv) -> None:
    """A hand-set variable that disagrees with the launcher would split the job silently."""
    if env.launcher == "torchrun":
        return
    for name, field in _PRESET.items():
        if name in environ and environ[name].strip() != str(getattr(env, field)):
            raise DistEnvError(
                f"{name}={environ[name]!r} is set by hand but {env.launcher} makes this rank's {field} "
                f"{getattr(env, field)}; unset {name} (nodewise derives it)"
            )


RENDEZVOUS_PREFIX = "rendezvous-"


def rendezvous_url(env: DistEnv, folder: Path) -> str | None:
    """How the ranks meet, when not torch's TCP store: a file in the job's folder.

    With rank 0 on a loopback address every rank runs on this machine, and a file store keeps the
    rendezvous off the network (torch's TCP store listens on every interface). Ranks on several
    hosts get None: ``env://``, the TCP store at MASTER_ADDR:MASTER_PORT, which they must reach.
    The file is named after the launch's port, fresh on every launch; the launcher removes old ones.
    """
    if env.master_addr not in _LOCAL_HOSTS:
        return None
    path = folder / f"{RENDEZVOUS_PREFIX}{env.master_port}"
    return f"file://{path}"  # rank and world size go to init_process_group itself


def is_local_host(host: str) -> bool:
    """Whether ``host`` names this machine."""
    return host in _LOCAL_HOSTS or host in (socket.gethostname(), socket.getfqdn())


def route_source(peer: str) -> str | None:
    """This host's address on the route to ``peer`` (no packet is sent), None if there is no route."""
    family = socket.AF_INET6 if ":" in peer else socket.AF_INET
    with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((peer, 9))
        return str(s.getsockname()[0])
    return None


def interface_with(address: str) -> str | None:
    """The network interface that holds ``address``."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address.split("%", 1)[0] == address for a in addresses):
            return name
    return None


def network_exports(env: DistEnv, environ: Mapping[str, str]) -> dict[str, str]:
    """Which interface gloo (and NCCL's bootstrap) use: the one that reaches rank 0.

    Without GLOO_SOCKET_IFNAME gloo binds the address this host's *name* resolves to, which on many
    machines is not one the other hosts can reach (Debian maps it to 127.0.1.1; hosts that share a
    name all resolve to one). The interface on the route to MASTER_ADDR is one they share. A value
    the user set is kept; a one-host job needs none.
    """
    if env.all_local:
        return {}
    source = route_source(env.master_addr)
    interface = interface_with(source) if source else None
    if interface is None:
        raise DistEnvError(
            f"no route from this host to rank 0's host MASTER_ADDR={env.master_addr}; check the address "
            "(the inventory's `address:`) and this host's network"
        )
    out = {}
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        if not environ.get(name):
            out[name] = interface
    return out
