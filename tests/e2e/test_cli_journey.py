"""A user's journey through the CLI: demo --detach, status, deploy mistakes, down."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from nodewise.ops.processes import listening, loopback, ray_processes, remove_state
from testkit.cli import NODEWISE, run, user_environment


@pytest.fixture(scope="module")
def cli_env() -> Iterator[dict[str, str]]:
    state, env = user_environment("nw-e2e-")
    yield env
    subprocess.run([NODEWISE, "down"], env=env, timeout=120, check=False)
    remove_state(state)


def check_nothing_answers_from_another_host(state: str) -> str | None:
    """The local default is for one machine: from another network host (a namespace joined to this
    one), no port of the demo's processes takes a request without credentials. Returns why the
    probe from another host could not run (no network namespaces here), else None."""
    from benchmarks._netns import available, peer_host, probe

    ports = listening(state)
    exposed = {port: where for port, where in ports.items() if not loopback(where[1])}
    print(f"{len(ports)} listening ports, {len(exposed)} not on loopback: {exposed}")
    # What Ray and Open MPI bind to every interface without a switch to change it: the replicas'
    # inter-deployment gRPC servers ("[::]:0" in Ray Serve, behind Ray's token) and mpirun's own
    # control port (Open MPI 4.1's oob/tcp listens on INADDR_ANY whatever oob_tcp_if_include says).
    assert all(name == "mpirun" or name.startswith("ray::ServeReplica:") for name, _ in exposed.values()), exposed
    if not available():
        return "not probed from another host: network namespaces need root and iproute2"
    with peer_host() as peer:
        answers = probe(peer, sorted(ports))
    for port, answer in answers.items():
        name = ports[port][0]
        if port not in exposed:
            assert answer == "refused", (port, ports[port], answer)
        elif name == "mpirun":
            assert answer.startswith("open, no HTTP answer: closed"), (port, answer)
        else:
            assert answer.endswith("grpc UNAUTHENTICATED"), (port, ports[port], answer)
    return None


def test_demo_status_mistakes_and_down(cli_env: dict[str, str]) -> None:
    demo = run(cli_env, "demo", "--detach")
    assert demo.returncode == 0, demo.stdout + demo.stderr
    out = demo.stdout
    assert "trained and registered models:/nodewise-digits/1" in out
    assert "prediction for a test image of a 7: 7" in out
    curl = next(line.strip() for line in out.splitlines() if line.strip().startswith("curl "))
    answer = subprocess.run(curl, shell=True, capture_output=True, text=True, timeout=30, check=True)
    assert len(json.loads(answer.stdout)["predictions"][0]) == 10
    # The multi-node path: two DeepSpeed ranks under mpirun, on "nodes" too small for one copy.
    assert "registered models:/nodewise-tiny-llama/1" in out
    assert "2 nodes x 1 device(s) = 2 tensor-parallel ranks" in out
    assert "generated (random weights, so nonsense): 'nodewise serves" in out
    # No Prefect server configured: the ephemeral API keeps its state in the state folder, not in ~/.prefect.
    home = Path(cli_env["HOME"])
    assert (Path(cli_env["NODEWISE_STATE_DIR"]) / "prefect").is_dir()
    assert not (home / ".prefect").exists(), sorted(p.name for p in home.iterdir())
    curl = [line.strip() for line in out.splitlines() if line.strip().startswith("curl ")][-1]
    answer = subprocess.run(curl, shell=True, capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(answer.stdout)["generated_text"][0].startswith("nodewise serves")

    status = json.loads(run(cli_env, "status", "--json").stdout)
    rows = {row["app"]: row for row in status["deployments"]}
    row = rows["nodewise-digits"]
    assert (row["version"], row["backend"], row["health"]) == ("1", "ray_serve", "healthy")
    assert httpx.get(f"{row['endpoint']}/version", timeout=10).json() == {"model": "nodewise-digits", "version": "1"}
    lm = rows["nodewise-tiny-llama"]
    assert (lm["backend"], lm["ranks"], lm["health"]) == ("deepspeed_mpi", 2, "healthy")
    not_probed = check_nothing_answers_from_another_host(cli_env["NODEWISE_STATE_DIR"])

    # The user's mistakes: one line, non-zero, no traceback, nothing deployed behind them.
    for args, line in [
        (("deploy", "nodewise-digits"), "error: model URI 'nodewise-digits' is not valid: use models:/NAME@ALIAS"),
        (("deploy", "models:/nodewise-digits@staging"), "error: model 'nodewise-digits' has no alias 'staging'"),
        (("deploy", "models:/nope/1"), "error: no registered model named 'nope'; registered models: nodewise-digits"),
    ]:
        result = run(cli_env, *args)
        assert result.returncode != 0
        errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1, result.stderr
        assert errors[0].startswith(line)
        assert "Traceback" not in result.stdout + result.stderr
    assert len(json.loads(run(cli_env, "status", "--json").stdout)["deployments"]) == 2

    job = json.loads((Path(cli_env["NODEWISE_STATE_DIR"]) / "deepspeed/nodewise-tiny-llama/cluster.json").read_text())
    shm = f"deepspeed_allreduce_buffer_{os.getuid()}_{job['master_addr']}_{job['master_port']}_*"
    assert len(list(Path("/dev/shm").glob(shm))) == 2  # one all-reduce buffer per rank while serving
    down = run(cli_env, "down", timeout=120)
    assert down.returncode == 0, down.stderr
    assert "stopped DeepSpeed app nodewise-tiny-llama" in down.stdout
    assert "stopped the local Ray instance" in down.stdout
    assert list(Path("/dev/shm").glob(shm)) == []
    assert ray_processes(cli_env["NODEWISE_STATE_DIR"]) == []
    assert json.loads(run(cli_env, "status", "--json").stdout)["deployments"] == []
    if not_probed:  # everything else above passed; the one part this machine cannot run is said in one line
        pytest.skip(not_probed)


# Ctrl-C with the LM's ranks running. SIGTERM reaches the same handler (tests/unit/test_cli_signals.py
# sends both signals for real): a second whole demo here cost CI about 85 s and showed nothing more.
def test_demo_serves_until_interrupted_then_stops_everything() -> None:
    state, env = user_environment("nw-int-")
    proc = subprocess.Popen([NODEWISE, "demo"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "press Ctrl-C to stop" in line:
                break
        assert any("prediction for a test image" in ln for ln in lines), "".join(lines)
        assert ray_processes(str(state)), "the demo should be serving from its own Ray instance"
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, rest
        assert "stopped DeepSpeed app nodewise-tiny-llama" in rest
        assert "stopped the local Ray instance" in rest
        assert ray_processes(str(state)) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run([NODEWISE, "down"], env=env, timeout=120, check=False, capture_output=True)
        remove_state(state)


def test_a_prefect_api_that_does_not_start_in_time_is_one_line_with_the_fix() -> None:
    state, env = user_environment("nw-eph-")
    env["NODEWISE_PREFECT__EPHEMERAL_STARTUP_TIMEOUT_S"] = "1"  # Prefect's temporary server needs longer here
    try:
        result = run(env, "deploy", "models:/nodewise-digits/1", timeout=120)
        assert result.returncode == 3, result.stdout + result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert errors == [
            "error: Prefect's temporary server did not answer within 1 s; start a server (`prefect server start`, "
            "or `nodewise up`) and set NODEWISE_PREFECT__API_URL to its API, or raise "
            "NODEWISE_PREFECT__EPHEMERAL_STARTUP_TIMEOUT_S"
        ], result.stderr
        assert "Traceback" not in result.stdout + result.stderr
    finally:
        remove_state(state)
