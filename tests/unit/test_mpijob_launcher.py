"""The MPIJob launcher entry: rank 0's host from the operator's hostfile, handed on to mpirun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def launch(argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "OMPI_MCA_orte_default_hostfile")}
    return subprocess.run(
        [sys.executable, "-m", "serving.mpijob_launcher", *argv],
        env={**clean, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def show_master() -> list[str]:  # stands in for mpirun: what it would pass on with -x MASTER_ADDR
    return [sys.executable, "-c", "import os; print(os.environ['MASTER_ADDR'])"]


def test_the_first_host_of_the_operators_hostfile_becomes_master_addr(tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"  # as kubeflow/mpi-operator v2beta1 writes it
    hostfile.write_text("llama-worker-0.llama.default.svc slots=2\nllama-worker-1.llama.default.svc slots=2\n")
    done = launch(show_master(), OMPI_MCA_orte_default_hostfile=str(hostfile))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "llama-worker-0.llama.default.svc"
    assert "rank 0 on llama-worker-0.llama.default.svc" in done.stderr


def test_a_master_addr_given_is_kept(tmp_path: Path) -> None:
    done = launch(show_master(), MASTER_ADDR="10.0.0.7", OMPI_MCA_orte_default_hostfile=str(tmp_path / "none"))
    assert (done.returncode, done.stdout.strip()) == (0, "10.0.0.7")


def test_no_hostfile_is_one_clear_line_and_nothing_started(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    started = [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
    cases = [
        ({}, "none of OMPI_MCA_orte_default_hostfile"),
        ({"OMPI_MCA_orte_default_hostfile": str(tmp_path / "missing")}, "cannot be read (No such file"),
        ({"OMPI_MCA_orte_default_hostfile": str(tmp_path / "empty")}, "lists no host"),
    ]
    (tmp_path / "empty").write_text("# no hosts yet\n")
    for env, message in cases:
        done = launch(started, **env)
        assert done.returncode == 2
        assert message in done.stderr
        assert "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert not marker.exists()
    missing = launch(["no-such-mpirun"], MASTER_ADDR="h")
    assert missing.returncode == 2
    assert "cannot run no-such-mpirun" in missing.stderr
