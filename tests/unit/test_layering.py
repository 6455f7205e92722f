"""The arrows go one way: flows -> tasks -> serving; serving never imports Prefect or nodewise."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(package: str) -> set[str]:
    found = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


def test_serving_imports_nothing_of_ours_nor_prefect() -> None:
    assert imported_modules("serving").isdisjoint({"prefect", "nodewise", "tasks", "flows"})


def test_tasks_do_not_import_flows() -> None:
    assert "flows" not in imported_modules("tasks")


def test_importing_the_serve_app_does_not_load_prefect() -> None:
    code = "import sys, serving.app; assert 'prefect' not in sys.modules, 'prefect was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
