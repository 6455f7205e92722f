"""The architecture holds: import-linter's contracts (pyproject.toml), and nothing heavy on fast paths."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("prefect", "ray", "mlflow", "kubernetes", "deepspeed")


def test_import_linter_contracts_are_kept() -> None:
    linter = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(linter)], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_importing_the_serve_app_does_not_load_prefect() -> None:
    code = "import sys, serving.app; assert 'prefect' not in sys.modules, 'prefect was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def _loaded_by(args: list[str], tmp_path: Path) -> tuple[dict[str, bool], str]:
    """Run the CLI in a fresh interpreter; which heavy libraries it imported, and what it printed."""
    code = (
        "import sys, json\n"
        "from typer.testing import CliRunner\n"
        "from nodewise.cli import app\n"
        f"result = CliRunner().invoke(app, {args!r})\n"
        f"print(json.dumps({{'loaded': {{m: m in sys.modules for m in {HEAVY!r}}}, 'out': result.output,"
        " 'code': result.exit_code}))\n"
    )
    env = {"NODEWISE_STATE_DIR": str(tmp_path / "state"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=True
    )
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["code"] == 0, answer["out"]
    return answer["loaded"], answer["out"]


def test_help_and_profiling_a_config_import_no_prefect_ray_or_mlflow(tmp_path: Path) -> None:
    loaded, out = _loaded_by(["--help"], tmp_path)
    assert "deploy" in out
    assert not any(loaded.values()), loaded
    config = str(ROOT / "benchmarks/configs/gpt2.json")
    loaded, out = _loaded_by(
        ["profile", config, "--inventory", str(ROOT / "deployments/inventory/gpu-cluster.yaml"), "--json"], tmp_path
    )
    assert json.loads(out)["param_count"] > 0
    assert not any(loaded.values()), loaded
