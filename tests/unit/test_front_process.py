"""tasks/mpi/front.py: the address the front's record gives users, and following rank 0's moves."""

from __future__ import annotations

import socket

import pytest

from tasks.mpi import front as front_process
from tasks.mpi.front import endpoint_host


def test_a_front_on_every_interface_is_recorded_at_this_machines_address_on_the_ranks_network(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    routes = {"10.40.0.11": "10.40.0.1"}  # this machine's address on the route to rank 0's host
    monkeypatch.setattr(front_process, "route_source", routes.get)
    assert endpoint_host("0.0.0.0", "http://10.40.0.11:8501") == "10.40.0.1"  # never 127.0.0.1
    assert endpoint_host("127.0.0.1", "http://127.0.0.1:8501") == "127.0.0.1"  # local ranks: loopback, as before
    assert endpoint_host("10.40.0.1", "http://10.40.0.11:8501") == "10.40.0.1"  # one address bound: that one
    assert endpoint_host("0.0.0.0", "http://10.99.0.5:8501") == socket.getfqdn()  # no route known: its name
    monkeypatch.setattr(front_process, "route_source", lambda peer: "127.0.1.1")  # Debian's name for itself
    assert endpoint_host("0.0.0.0", "http://10.40.0.11:8501") == socket.getfqdn()
    hostname = socket.gethostname()  # rank 0 on this very machine, named as the launcher recorded it
    assert endpoint_host("0.0.0.0", f"http://{hostname}:8501") == hostname
