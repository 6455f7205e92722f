"""Free ports on 127.0.0.1 for the services a test or a benchmark starts."""

from __future__ import annotations

import random
import socket


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_block(size: int = 4) -> int:
    """A base port with ``size`` consecutive free ports (Ray's instance uses 4)."""
    for _ in range(200):
        base = random.randrange(20000, 29000)  # below Serve's direct-ingress ports (30000+)
        if all(_free(base + i) for i in range(size)):
            return base
    raise RuntimeError("no free port block")
