"""`nodewise render`: a registered model's Kubernetes manifests from the CLI, validated strictly,
and `--apply` through the real kubernetes client against the in-process API emulator (no
cluster: nothing becomes ready there, so the wait ends in its timeout error)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from nodewise.ops.processes import remove_state
from testkit.cli import NODEWISE, user_environment
from tests.k8s_schema import validate
from tests.kube_emulator import kube_emulator, write_kubeconfig

ROOT = Path(__file__).resolve().parents[2]
GPU_CLUSTER = str(ROOT / "deployments" / "inventory" / "gpu-cluster.yaml")


@pytest.fixture(scope="module")
def user() -> Iterator[tuple[Path, dict[str, str]]]:
    """A user's state with the demo model registered in its MLflow."""
    state, env = user_environment("nw-render-")
    script = (
        "import mlflow, sys; from nodewise.demo_models import register_demo_model; "
        f"mlflow.set_tracking_uri('sqlite:///{state}/mlflow.db'); register_demo_model(sys.argv[1])"
    )
    subprocess.run([sys.executable, "-c", script, str(state / "artifacts")], env=env, check=True, timeout=300, cwd=ROOT)
    yield state, env
    remove_state(state)


def nodewise(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([NODEWISE, *args], env=env, capture_output=True, text=True, timeout=600, check=False)


def test_render_writes_strictly_valid_manifests_in_apply_order(user: tuple[Path, dict[str, str]]) -> None:
    state, env = user
    out = state / "k8s"
    args = ["models:/nodewise-digits@champion", "--inventory", GPU_CLUSTER, "--out", str(out)]
    refused = nodewise(env, "render", *args)
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1
    assert refused.stderr.startswith("error: the tracking URI sqlite:///")
    assert "NODEWISE_MLFLOW__TRACKING_URI" in refused.stderr
    assert "--allow-local" in refused.stderr
    assert not out.exists()  # nothing half-written
    done = nodewise(env, "render", *args, "--allow-local")
    assert done.returncode == 0, done.stderr
    files = sorted(out.glob("*.yaml"))
    assert [f.name.split("-", 2)[1] for f in files] == [
        "serviceaccount",
        "role",
        "rolebinding",
        "rayservice",
        "service",
        "podmonitor",  # Prometheus Operator's: the replicas' metrics ports
    ]
    for path in files:
        validate(yaml.safe_load(path.read_text()))
    assert "warning: --allow-local: the tracking URI sqlite:///" in done.stderr  # still said
    assert "plan: " in done.stdout


def test_render_mistakes_are_one_line(user: tuple[Path, dict[str, str]]) -> None:
    state, env = user
    wrong = nodewise(env, "render", "models:/nodewise-digits@champion", "--target", "ecs", "--out", str(state / "x"))
    assert (wrong.returncode, wrong.stderr.strip()) == (2, "error: --target 'ecs' is not known; use --target k8s")
    typo = nodewise(
        env,
        "render",
        "models:/nodewise-digits@champin",
        "--inventory",
        GPU_CLUSTER,
        "--out",
        str(state),
        "--allow-local",
    )
    assert typo.returncode != 0
    assert typo.stderr.count("\n") == 1
    assert typo.stderr.startswith("error: ")
    assert "Traceback" not in typo.stderr


def test_render_apply_creates_the_objects_then_names_what_is_not_ready(
    user: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    state, env = user
    with kube_emulator() as url:
        env = {**env, "KUBECONFIG": str(write_kubeconfig(tmp_path / "config", url))}
        args = ["models:/nodewise-digits@champion", "--inventory", GPU_CLUSTER, "--out", str(state / "k8s")]
        args.append("--allow-local")
        done = nodewise(env, "render", *args, "--apply", "--timeout", "2")
    assert "created RayService default/nodewise-digits" in done.stdout
    assert done.returncode == 1
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith("error: RayService default/nodewise-digits not ready after 2 s (no status yet)")
    )
