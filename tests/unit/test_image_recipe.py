"""The image recipe (deployments/image/Containerfile) names what exists: what it copies, the
entry points it runs, the pin it reads. Cheap here; the build itself is scripts/build-image.sh,
run by hand (it downloads a Debian base and the stack)."""

import re
import shlex
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "deployments" / "image" / "Containerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the recipe, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", RECIPE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_every_copied_path_is_in_the_repository_and_committed() -> None:
    tracked = set(subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split())
    copies = [shlex.split(args)[:-1] for word, args in instructions() if word == "COPY"]
    assert copies
    for sources in copies:
        for source in sources:
            path = ROOT / source
            assert path.exists(), f"COPY {source}: no such path"
            # the build context is `git archive HEAD`: only committed files are there
            assert source in tracked or any(t.startswith(source.rstrip("/") + "/") for t in tracked), source


def test_the_entry_points_exist() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["nodewise"] == "nodewise.cli:main"
    entry = ROOT / "deployments" / "image" / "entrypoint.sh"
    assert entry.stat().st_mode & 0o111  # executable
    assert subprocess.run(["sh", "-n", str(entry)], check=False).returncode == 0
    # what the rendered manifests run in this image
    assert (ROOT / "serving" / "deepspeed_worker.py").exists()
    from serving.app import from_config  # serveConfigV2's import_path

    assert callable(from_config)
    words = dict(instructions())
    assert "nodewise-entrypoint" in words["ENTRYPOINT"]
    assert words["USER"] == "nodewise"  # not root


def test_the_torch_pin_the_recipe_reads_is_there() -> None:
    [run] = [args for word, args in instructions() if word == "RUN" and "torch_pin" in args]
    pattern = re.search(r"sed -n '(s/.*/p)'", run)
    assert pattern
    found = subprocess.run(
        ["sed", "-n", pattern.group(1), str(ROOT / "pyproject.toml")], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert re.fullmatch(r"\d+\.\d+\.\d+", found), found


def test_no_secret_or_state_is_baked_in() -> None:
    text = RECIPE.read_text().lower()
    for word in ("password", "token=", "secret=", "aws_secret", ".nodewise/", "mlflow.db"):
        assert word not in text
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "build-image.sh")], check=False).returncode == 0
