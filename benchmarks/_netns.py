"""Other network hosts on this machine: Linux network namespaces joined to this one by a veth pair.

A namespace is a real host as far as TCP is concerned: its own interfaces, addresses and routes.
``peer_host()`` makes one whose only way out is a point-to-point link to this machine (no route
beyond it, so nothing leaves the machine), runs commands in it, and removes it afterwards (which
removes both ends of the link). It needs root and `ip` (iproute2); ``available()`` says whether
this machine has them.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_COUNTER = itertools.count()


def available() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@dataclass(frozen=True)
class PeerHost:
    """A namespace host: ``address`` is its own, ``this_host`` is this machine as it sees it."""

    name: str
    address: str
    this_host: str

    def run(self, argv: list[str], timeout: float = 60, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *argv], capture_output=True, text=True, timeout=timeout, **kwargs
        )

    def python(self, code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run ``code`` with this interpreter (and the repository on its path) inside the namespace."""
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        return self.run([sys.executable, "-c", code, *args], timeout=timeout, env=env, cwd=ROOT)


@contextlib.contextmanager
def peer_host() -> Iterator[PeerHost]:
    """A second host joined to this machine by a /30 link (this machine .1, the namespace .2)."""
    n = (os.getpid() * 7 + next(_COUNTER)) % 4000
    name, outer, inner = f"nwp{n}", f"nwp{n}h", f"nwp{n}n"
    subnet = f"10.{200 + n // 250}.{n % 250}"
    this_host, address = f"{subnet}.1", f"{subnet}.2"
    _ip("netns", "add", name)
    try:
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", name)
        _ip("addr", "add", f"{this_host}/30", "dev", outer)
        _ip("link", "set", outer, "up")
        _ip("-n", name, "addr", "add", f"{address}/30", "dev", inner)
        _ip("-n", name, "link", "set", inner, "up")
        _ip("-n", name, "link", "set", "lo", "up")
        yield PeerHost(name=name, address=address, this_host=this_host)
    finally:
        subprocess.run(["ip", "link", "del", outer], capture_output=True, timeout=30, check=False)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30, check=False)


# What a client on another host gets from one port: run inside the namespace by ``probe``.
_PROBE = r"""
import json, socket, sys
import grpc

host, ports = sys.argv[1], json.loads(sys.argv[2])
BODY = b'{"inputs": [[0.0, 1.0, 2.0, 3.0]]}'
REQUESTS = [  # a metrics or stats page, then an inference
    b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(BODY), BODY),
]

def one(port, request):
    try:
        s = socket.create_connection((host, port), timeout=3)
    except ConnectionRefusedError:
        return "refused"
    except OSError as e:
        return f"unreachable ({e.__class__.__name__})"
    s.settimeout(3)
    try:
        s.sendall(request)
        first = s.recv(200)
    except OSError as e:
        first = b"" if not isinstance(e, TimeoutError) else b"<no answer in 3 s>"
    finally:
        s.close()
    line = first.split(b"\r\n", 1)[0].decode(errors="replace")
    return "http " + line if line.startswith("HTTP/") else "open, no HTTP answer: " + (line[:60] or "closed")

def tcp(port):
    for request in REQUESTS:
        outcome = one(port, request)
        if not outcome.startswith("open, no HTTP answer"):
            return outcome
    return outcome

def grpc_call(port):  # an unauthenticated call, as Ray's own clients make it but without the token
    channel = grpc.insecure_channel(f"{host}:{port}")
    try:
        channel.unary_unary("/ray.serve.ASGIService/HandleRequest")(b"", timeout=5)
        return "grpc OK"
    except grpc.RpcError as e:
        return "grpc " + e.code().name
    finally:
        channel.close()

out = {}
for port in ports:
    outcome = tcp(port)
    if outcome.startswith("open, no HTTP answer"):
        outcome += "; " + grpc_call(port)
    out[str(port)] = outcome
print(json.dumps(out))
"""


def probe(peer: PeerHost, ports: list[int]) -> dict[int, str]:
    """From ``peer``: what each of this machine's ``ports`` answers to a client without credentials
    (an HTTP inference request; where the port speaks no HTTP, a gRPC call without Ray's token)."""
    done = peer.python(_PROBE, peer.this_host, json.dumps(sorted(ports)), timeout=30 + 10 * len(ports))
    assert done.returncode == 0, done.stderr[-2000:]
    return {int(k): v for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}
