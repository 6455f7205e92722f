"""The docs cannot rot: generated pages match the code, the site builds strictly (no broken link,
page or anchor), every `nodewise` command line in the docs parses, and the examples of the
placement page and the deploy guide run as shown."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS))
import gen_reference  # noqa: E402

# The two set-up commands a fresh machine needs; CI runs the second (.ci/run).
COMMANDS = (
    "./scripts/setup.sh && .venv/bin/nodewise demo",
    "./scripts/setup.sh && .venv/bin/python -m pytest",
)


def blocks(page: Path, languages: tuple[str, ...] = ("bash", "text")) -> list[str]:
    """The fenced code blocks of ``page`` in those languages."""
    pattern = r"^```(?:" + "|".join(languages) + r")\n(.*?)^```"
    return re.findall(pattern, page.read_text(), flags=re.S | re.M)


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``nodewise ARGS`` in a process of its own (the CLI points libraries at its state folder)."""
    code = "import sys; from nodewise.cli import main; sys.argv = ['nodewise', *sys.argv[1:]]; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_generated_pages_match_the_code() -> None:
    stale = gen_reference.stale()
    assert not stale, f"stale generated docs {stale}: run `python docs/gen_reference.py`"


def test_every_setting_is_documented() -> None:
    page = (DOCS / "reference/settings.md").read_text()
    assert "(no description yet)" not in page, "give each new setting a Field(description=...)"
    from nodewise.core.settings import Settings

    def count(model: type) -> int:
        from pydantic import BaseModel

        nested = [f.annotation for f in model.model_fields.values()]
        return sum(count(a) if isinstance(a, type) and issubclass(a, BaseModel) else 1 for a in nested)

    assert page.count("<br>`NODEWISE_") == count(Settings)


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    assert (tmp_path / "site/reference/settings/index.html").exists()
    assert (tmp_path / "site/benchmarks/figures/autoscale.png").exists()


def test_readme_is_a_landing_page_with_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 200
    for command in COMMANDS:
        assert readme.count(command) == 1, command
        assert command in (DOCS / "getting-started.md").read_text()
    for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", readme):
        assert (ROOT / link).exists(), f"README links to {link}, which does not exist"


def test_every_nodewise_command_line_in_the_docs_parses() -> None:
    """Each `nodewise ...` line of a code block names a real command with real options."""
    import typer.main

    from nodewise.cli.app import app

    group = typer.main.get_command(app)
    pages = [ROOT / "README.md", *(p for p in DOCS.rglob("*.md") if "reference" not in p.parts)]
    checked = 0
    for page in pages:
        for block in blocks(page):
            for line in block.splitlines():
                found = re.match(r"^(?:\$ )?(?:\.venv/bin/)?nodewise (.+?)(?:\s+#.*)?$", line.strip())
                if not found:
                    continue
                name, *args = shlex.split(found.group(1))
                command = group.get_command(group.context_class(group, info_name="nodewise"), name)
                assert command is not None, f"{page.name}: no command `nodewise {name}`"
                command.make_context(name, args)  # raises on an unknown option or a missing argument
                checked += 1
    assert checked >= 10


def test_the_placement_example_is_what_the_cli_prints(tmp_path: Path) -> None:
    (block,) = [b for b in blocks(DOCS / "concepts/placement.md", ("text",)) if b.startswith("$ ")]
    command, *expected = block.splitlines()
    args = shlex.split(command.removeprefix("$ "))[1:]
    env = {**os.environ, "NODEWISE_STATE_DIR": str(tmp_path / "state")}
    result = run_cli(args, env, ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == expected


def test_the_deploy_guide_registers_and_profiles_as_shown(tmp_path: Path) -> None:
    """The guide's script (included in the page from docs/examples/) and its `profile` line, run here;
    `deploy` needs Ray and is the e2e suite's (tests/e2e/test_cli_journey.py)."""
    guide = DOCS / "how-to/deploy-your-model.md"
    assert "```python\n--8<--\ndocs/examples/register_model.py\n--8<--\n```" in guide.read_text()
    lines = [line for block in blocks(guide, ("bash",)) for line in block.splitlines()]
    assert ".venv/bin/python docs/examples/register_model.py" in lines
    (profile_line,) = [line for line in lines if line.startswith(".venv/bin/nodewise profile")]
    state = tmp_path / ".nodewise"
    state.mkdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{state}/mlflow.db", "NODEWISE_STATE_DIR": str(state)}
    registered = subprocess.run(
        [sys.executable, str(DOCS / "examples/register_model.py")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert registered.returncode == 0, registered.stderr
    assert "registered models:/my-model/1, alias @champion" in registered.stdout
    # --no-measure: the measurement subprocess is the profiler's tests' (it adds ~10 s here)
    args = [*shlex.split(profile_line)[1:], "--no-measure"]
    profiled = run_cli(args, env, tmp_path)
    assert profiled.returncode == 0, profiled.stderr
    assert profiled.stdout.startswith("models:/my-model/1: 1,539 parameters")
    assert "serving 1 with Ray Serve" in profiled.stdout
