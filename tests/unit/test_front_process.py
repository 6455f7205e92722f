"""tasks/mpi/front.py: the address the front's record gives users, and following rank 0's moves."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest

from nodewise.core.procs import free_port_block
from nodewise.core.settings import Settings
from tasks.mpi import front as front_process
from tasks.mpi.front import endpoint_host, ensure_front, follow, read_front, stop_front
from testkit import wait_until


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


def test_a_front_for_other_hosts_is_recorded_at_their_network_and_follows_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    own = "192.0.2.1"  # this machine's address on the ranks' network (unit tests reach loopback alone)
    monkeypatch.setattr(front_process, "route_source", lambda peer: own)
    settings = Settings(state_dir=tmp_path, deepspeed={"port": free_port_block(1), "stop_grace_s": 2})
    settings.state.deepspeed_job("app").mkdir(parents=True)
    rank0 = "http://10.40.0.11:8501"  # a rank 0 on another host (not answering: the front holds)
    made = ensure_front(settings, "app", "0.0.0.0", rank0)
    try:
        assert made.endpoint == f"http://{own}:{settings.deepspeed.port}"  # not the loopback it was
        assert read_front(settings, "app").endpoint == made.endpoint
        here = f"http://127.0.0.1:{settings.deepspeed.port}"  # it listens on every interface, loopback too
        assert httpx.get(f"{here}/front", timeout=10).json()["upstream"] == rank0
        moved = "http://10.40.0.12:8501"  # the restart put rank 0 on the spare
        (settings.state.deepspeed_job("app") / "cluster.json").write_text(f'{{"endpoint": "{moved}"}}')
        assert follow(settings, "app", moved).upstream == moved  # the watchdog notes it in front.json
        assert ensure_front(settings, "app", "0.0.0.0", moved).pid == made.pid  # the same front, kept
        upstream = lambda: httpx.get(f"{here}/front", timeout=10).json()["upstream"]  # noqa: E731
        wait_until(lambda: upstream() == moved, 10, "the front reading rank 0's new address from the record")
        assert read_front(settings, "app").upstream == moved
    finally:
        stop_front(settings, "app")
