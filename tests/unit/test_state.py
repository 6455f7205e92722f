"""The state folder's files: locked and atomic, and a damaged one is an error naming it, never a reset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nodewise.cli import app
from nodewise.core.errors import CorruptStateFile, LockTimeout
from nodewise.core.state import StateFolder, locked_json, read_json, try_lock, wait_lock


def test_locked_json_reads_modifies_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    with locked_json(path) as data:
        data["a"] = 1
    with locked_json(path) as data:
        data["b"] = data["a"] + 1
    assert json.loads(path.read_text()) == {"a": 1, "b": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "s.lock"]  # no temp file left


def test_a_truncated_state_file_is_an_error_naming_it_and_is_left_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "deployments.json"
    path.write_text('{"nodewise-digits": {"app_name": "nodewise-dig')
    with pytest.raises(CorruptStateFile, match=rf"state file {path} is not valid JSON .*move it away"):
        read_json(path)
    with pytest.raises(CorruptStateFile), locked_json(path) as data:
        data["x"] = 1
    assert path.read_text() == '{"nodewise-digits": {"app_name": "nodewise-dig'  # nothing rewritten


def test_the_cli_names_the_damaged_file_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODEWISE_STATE_DIR", str(tmp_path))
    (tmp_path / "deployments.json").write_text("{not json")
    result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 4
    assert result.output.strip().startswith(f"error: state file {tmp_path / 'deployments.json'} is not valid JSON")
    assert "Traceback" not in result.output


def test_locks(tmp_path: Path) -> None:
    path = tmp_path / "locks" / "x.lock"
    with try_lock(path) as first:
        assert first
        with try_lock(path) as second:  # another holder (another open file) is refused at once
            assert not second
        with pytest.raises(LockTimeout, match="another deploy held its lock"), wait_lock(path, 0.2, "another deploy"):
            pass


def test_every_path_lives_under_the_state_folder(tmp_path: Path) -> None:
    folder = StateFolder(tmp_path)
    for name in ("records", "k8s_records", "promotions", "poller", "watchdog", "services", "deepspeed"):
        assert getattr(folder, name).is_relative_to(tmp_path)
    assert folder.deploy_lock("a/b model").name == "deploy-a_b_model.lock"


def test_a_deploy_lock_is_reentrant_in_one_thread_and_exclusive_across_processes(tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    from tasks.records import deploy_lock

    folder = StateFolder(tmp_path)
    holder = (
        "import sys, time; from pathlib import Path\n"
        "from nodewise.core.state import StateFolder; from tasks.records import deploy_lock\n"
        "with deploy_lock(StateFolder(Path(sys.argv[1])), 'm'):\n"
        "    print('held', flush=True); time.sleep(3)\n"
    )
    other = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout is not None
        assert other.stdout.readline().strip() == "held"
        with pytest.raises(LockTimeout, match="another deploy of 'm' held its lock"), deploy_lock(folder, "m", 0.5):
            pass
        started = time.monotonic()
        with deploy_lock(folder, "m", 30), deploy_lock(folder, "m", 0.1):  # waits its turn, then re-enters
            assert time.monotonic() - started > 1.0  # the other process held it for its 3 s
    finally:
        other.wait(timeout=30)
