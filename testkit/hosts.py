"""Several network hosts on this machine: namespaces on one bridge, reached the way mpirun reaches machines.

``hosts(n)`` makes a Linux bridge with an address of this machine on it and ``n`` network
namespaces, each with its own address on the bridge (``lo`` up, no route beyond the bridge, so
nothing leaves the machine). ``Hosts.agent`` is a remote-shell agent for mpirun
(``--mca plm_rsh_agent``) and for nodewise's reachability probe: called as ``AGENT HOST CMD...``,
it runs CMD in the namespace that owns HOST, as ``ssh HOST CMD...`` would on real machines.
``kill_host`` is a node dying (every process in its namespace killed), ``cut``/``mend`` a partition
(its link down and up). Everything is removed on exit, also when the test fails.

Used by the ``multihost`` tests and by benchmarks/multihost.py. Needs root and iproute2
(``available()``); namespaces share the machine's hostname, so ranks tell hosts apart by address.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_COUNTER = itertools.count()


def available() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


def why_unavailable() -> str:
    if os.geteuid() != 0:
        return "multihost tests make network namespaces, which needs root"
    return "multihost tests need `ip` (apt-get install iproute2)"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


_AGENT = """#!@PYTHON@
# mpirun's remote shell for namespace hosts, as ssh behaves: AGENT [ssh options] HOST CMD...
# fails (255) when HOST is off the network, else runs CMD on HOST in a session of its own.
import os, socket, sys

args = sys.argv[1:]
while args and args[0].startswith("-"):  # ssh options mpirun may pass (-x, -o ...): meaningless here
    args = args[2:] if args[0] in ("-o", "-p", "-i", "-l") else args[1:]
host, command = args[0], " ".join(args[1:])
table = dict(line.split() for line in open(@TABLE@) if line.strip())
if host not in table:
    sys.exit(f"ssh: Could not resolve hostname {host}")
try:  # the network path, as ssh's: refused means the host is up (nothing listens on 22)
    socket.create_connection((host, 22), timeout=@TIMEOUT@).close()
except ConnectionRefusedError:
    pass
except OSError as e:
    print(f"ssh: connect to host {host} port 22: {e.strerror or 'Connection timed out'}", file=sys.stderr)
    sys.exit(255)
os.execvp("ip", ["ip", "netns", "exec", table[host], "setsid", "-w", "/bin/sh", "-c", command])
"""


@dataclass
class Host:
    """One namespace host."""

    name: str  # the namespace
    address: str
    link: str  # its end of the bridge, on this machine's side

    def run(self, argv: list[str], timeout: float = 60, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *argv], capture_output=True, text=True, timeout=timeout, **kwargs
        )

    def popen(self, argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["ip", "netns", "exec", self.name, *argv], **kwargs)  # type: ignore[call-overload]

    def processes(self) -> list[str]:
        """``pid: command line`` of each process on this host (for a failing assert to show)."""
        out = []
        for pid in self.pids():
            with contextlib.suppress(OSError):
                out.append(f"{pid}: " + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:300])
        return out

    def pids(self) -> list[int]:
        """Every process running in this host's namespace."""
        out = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True, timeout=30)
        return [int(p) for p in out.stdout.split()]


@dataclass
class Hosts:
    """``n`` hosts on a bridge; ``this_host`` is this machine's address on it."""

    hosts: list[Host]
    bridge: str
    this_host: str
    subnet: str  # CIDR, for mpirun's *_if_include
    agent: Path
    cut_links: set[str] = field(default_factory=set)

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def __len__(self) -> int:
        return len(self.hosts)

    @property
    def addresses(self) -> list[str]:
        return [h.address for h in self.hosts]

    def kill_host(self, host: Host) -> int:
        """A node dies: off the network, every process in its namespace SIGKILLed. Returns how many."""
        self.cut(host)
        pids = host.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return len(pids)

    def revive(self, host: Host) -> None:
        """The dead node is back: on the network again, nothing running on it."""
        self.mend(host)

    def cut(self, host: Host) -> None:
        """A partition: ``host`` loses its link (its processes live on, unreachable)."""
        _ip("link", "set", host.link, "down")
        self.cut_links.add(host.link)

    def mend(self, host: Host) -> None:
        _ip("link", "set", host.link, "up")
        self.cut_links.discard(host.link)

    def mpirun_args(self) -> list[str]:
        """What mpirun needs to reach these hosts and talk over the bridge only."""
        return [  # the agent itself is nodewise's remote_shell setting (mpirun's plm_rsh_agent)
            "--mca", "oob_tcp_if_include", self.subnet,
            "--mca", "btl_tcp_if_include", self.subnet,
            "--mca", "btl", "self,tcp",
        ]  # fmt: skip

    def leftovers(self) -> dict[str, list[int]]:
        """Processes still running on each host (none after a clean stop)."""
        return {h.address: pids for h in self.hosts if (pids := h.pids())}


@contextlib.contextmanager
def hosts(n: int) -> Iterator[Hosts]:
    """``n`` namespace hosts on a fresh bridge (this machine .1, the hosts .11, .12, ...)."""
    k = (os.getpid() * 13 + next(_COUNTER)) % 250
    bridge, prefix = f"nwb{k}", f"10.{210 + k // 250}.{k}"
    made: list[Host] = []
    folder = Path(tempfile.mkdtemp(prefix="nw-hosts-"))
    table = folder / "hosts"
    agent = folder / "agent"
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{prefix}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for i in range(n):
            name, outer = f"nwh{k}x{i}", f"nwh{k}x{i}o"
            host = Host(name=name, address=f"{prefix}.{11 + i}", link=outer)
            _ip("netns", "add", name)
            made.append(host)
            _ip("link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", name)
            _ip("link", "set", outer, "master", bridge)
            _ip("link", "set", outer, "up")
            _ip("-n", name, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", name, "link", "set", "eth0", "up")
            _ip("-n", name, "link", "set", "lo", "up")
        table.write_text("".join(f"{h.address} {h.name}\n" for h in made))
        script = _AGENT.replace("@PYTHON@", sys.executable).replace("@TABLE@", repr(str(table)))
        agent.write_text(script.replace("@TIMEOUT@", "2"))
        agent.chmod(0o755)
        yield Hosts(hosts=made, bridge=bridge, this_host=f"{prefix}.1", subnet=f"{prefix}.0/24", agent=agent)
    finally:
        for host in made:
            for pid in host.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            subprocess.run(["ip", "link", "del", host.link], capture_output=True, timeout=30, check=False)
            subprocess.run(["ip", "netns", "del", host.name], capture_output=True, timeout=30, check=False)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True, timeout=30, check=False)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":  # a quick look: python -m testkit.hosts 2
    with hosts(int(sys.argv[1]) if len(sys.argv) > 1 else 2) as made:
        for h in made.hosts:
            print(h.address, h.run(["ip", "-br", "addr"]).stdout.strip().replace("\n", "; "))
        print(subprocess.run([str(made.agent), made[0].address, "ping", "-c1", "-W1", made[-1].address],
                             capture_output=True, text=True).stdout.splitlines()[-2:])  # fmt: skip
