"""The parts of the multi-host DeepSpeed path that need no second host: which interface gloo uses,
which hosts a relaunch picks (through a real remote-shell script), and mpirun's supervisor telling
a Prefect API that the job died (a real process posting to a real HTTP server on loopback)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from nodewise.core.errors import NotEnoughHosts
from nodewise.core.settings import Settings
from serving.dist_env import DistEnv, DistEnvError, network_exports
from tasks.mpi.hosts import choose_hosts, host_down
from tasks.mpi.records import Placement
from tasks.mpi.supervise import EXIT_FILE

ROOT = Path(__file__).resolve().parents[2]


def _env(master: str, local_size: int = 1) -> DistEnv:
    return DistEnv("openmpi", rank=1, world_size=2, local_rank=0, local_size=local_size, master_addr=master,
                   master_port=29500)  # fmt: skip


def test_gloo_uses_the_interface_that_reaches_rank_0_unless_the_user_chose_one() -> None:
    assert network_exports(_env("127.0.0.1"), {}) == {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
    assert network_exports(_env("127.0.0.1"), {"GLOO_SOCKET_IFNAME": "ib0"}) == {"NCCL_SOCKET_IFNAME": "lo"}
    assert network_exports(_env("127.0.0.1", local_size=2), {}) == {}  # one host: nothing to choose


def test_an_unroutable_rank_0_is_one_line_naming_the_address(monkeypatch: pytest.MonkeyPatch) -> None:
    import serving.dist_env

    monkeypatch.setattr(serving.dist_env, "route_source", lambda peer: None)  # the kernel: no route to it
    with pytest.raises(DistEnvError, match=r"no route from this host to rank 0's host MASTER_ADDR=10.9.9.9; check"):
        network_exports(_env("10.9.9.9"), {})


@pytest.fixture
def shell(tmp_path: Path) -> Path:
    """A remote shell like ssh: hosts named up-* answer, others are off the network."""
    script = tmp_path / "rsh"
    script.write_text(
        '#!/bin/sh\ncase "$1" in up-*) shift; exec /bin/sh -c "$*" ;;\n'
        '*) echo "ssh: connect to host $1 port 22: No route to host" >&2; exit 255 ;; esac\n'
    )
    script.chmod(0o755)
    return script


def test_a_relaunch_replaces_a_host_that_is_down_by_a_spare(tmp_path: Path, shell: Path) -> None:
    settings = Settings(state_dir=tmp_path, deepspeed={"remote_shell": str(shell)})
    assert host_down("up-a", settings) is None
    assert host_down("down-b", settings) == f"down-b is unreachable through {str(shell)!r} (ssh: connect to host " \
        "down-b port 22: No route to host)"  # fmt: skip
    placement = Placement(hosts=["up-a", "down-b"], ranks_per_host=1, spares=["down-c", "up-d"])
    chosen, down = choose_hosts(placement, settings)
    assert chosen == ["up-a", "up-d"]
    assert sorted(down) == ["down-b", "down-c"]


def test_too_few_hosts_up_says_how_many_and_which(tmp_path: Path, shell: Path) -> None:
    settings = Settings(state_dir=tmp_path, deepspeed={"remote_shell": str(shell)})
    with pytest.raises(NotEnoughHosts) as got:
        choose_hosts(Placement(hosts=["up-a", "down-b"], ranks_per_host=1), settings)
    assert str(got.value).startswith(
        "not enough nodes: the job needs 2 host(s) and only 1 of 2 answer (down: down-b); it is relaunched when"
    )
    assert list(got.value.down) == ["down-b"]
    assert got.value.exit_code == 3


def test_a_missing_remote_shell_is_named_with_the_setting(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path, deepspeed={"remote_shell": str(tmp_path / "nope")})
    assert "set NODEWISE_DEEPSPEED__REMOTE_SHELL" in (host_down("gpu-a", settings) or "")


class _Events(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, object]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Events.received.append((self.path, json.loads(body)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def _supervise(folder: Path, url: str, command: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "tasks.mpi.supervise", str(folder), "--events", url, "--", "sh", "-c", command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)


def test_a_job_that_dies_is_recorded_and_posted_as_an_event_at_once(tmp_path: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Events)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        (tmp_path / "cluster.json").write_text(json.dumps({"app_name": "big-lm", "hosts": ["gpu-a", "gpu-b"]}))
        done = _supervise(tmp_path, f"http://127.0.0.1:{server.server_port}/api", "exit 137")
    finally:
        server.shutdown()
    assert done.returncode == 137
    assert "posted nodewise.cluster.exited" in done.stdout
    record = json.loads((tmp_path / EXIT_FILE).read_text())
    assert (record["status"], record["stopped"]) == (137, False)
    [(path, [event])] = _Events.received
    assert path == "/api/events"
    assert event["event"] == "nodewise.cluster.exited"
    assert event["resource"]["prefect.resource.id"] == "nodewise.deployment.big-lm"
    assert event["payload"]["hosts"] == ["gpu-a", "gpu-b"]


def test_a_prefect_api_that_is_down_is_said_and_the_exit_still_recorded(tmp_path: Path) -> None:
    from tests.conftest import free_port

    done = _supervise(tmp_path, f"http://127.0.0.1:{free_port()}/api", "exit 1")
    assert done.returncode == 1
    assert "event nodewise.cluster.exited not posted (ConnectError" in done.stdout
    assert json.loads((tmp_path / EXIT_FILE).read_text())["status"] == 1
