"""The local default stays on this machine: Ray's one-machine switch and HAProxy's launcher script.

The whole picture (every port of a running demo probed from another network host) is in
tests/e2e/test_cli_journey.py; here the two pieces nodewise adds, run as they are.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from nodewise.core.runtime import library_environment
from nodewise.core.settings import Settings

# The bind lines of Ray Serve's HAProxy template (ray/serve/_private/haproxy_templates.py), as rendered.
RENDERED = """frontend prometheus
    bind :9101
frontend http_frontend
    bind 127.0.0.1:8000
listen stats
  bind *:8404
  stats enable
"""


def test_the_local_instance_is_a_one_machine_ray_and_an_existing_cluster_is_left_as_it_is(tmp_path: Path) -> None:
    env = library_environment(Settings(state_dir=tmp_path))
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert env["RAY_SERVE_HAPROXY_BINARY_PATH"] == str(tmp_path / "ray" / "haproxy")
    joinable = library_environment(Settings(state_dir=tmp_path, ray={"local_only": False}))
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in joinable
    # HAProxy still starts through the launcher (it bounds cold starts), which leaves binds alone
    assert joinable["RAY_SERVE_HAPROXY_BINARY_PATH"] == str(tmp_path / "ray" / "haproxy")
    on_the_network = library_environment(Settings(state_dir=tmp_path, serve={"host": "0.0.0.0"}))
    assert on_the_network["RAY_SERVE_HAPROXY_BINARY_PATH"] == str(tmp_path / "ray" / "haproxy")
    existing = library_environment(Settings(state_dir=tmp_path, ray={"address": "10.0.0.5:6379"}))
    assert not any(k.startswith(("RAY_ENABLE", "RAY_SERVE_")) for k in existing)


@pytest.mark.parametrize("host", ["127.0.0.1", "10.1.2.3"])
def test_the_launcher_moves_stats_and_metrics_to_serves_host_then_runs_haproxy(tmp_path: Path, host: str) -> None:
    from tasks.rayserve import cluster

    settings = Settings(state_dir=tmp_path, serve={"host": host})
    launcher = cluster.write_haproxy_launcher(settings)
    assert launcher is not None
    # Stand in for HAProxy (its real binary is in the script): print the arguments and the config it gets.
    fake = tmp_path / "fake-haproxy"
    fake.write_text('#!/bin/sh\necho "args: $*"\ncat "$3"\n')
    fake.chmod(0o755)
    text = launcher.read_text()
    *script, last = text.splitlines()
    assert last.startswith("exec ")
    assert "haproxy" in last  # the real binary
    launcher.write_text("\n".join([*script, f'exec {fake} "$@"']) + "\n")
    config = tmp_path / "haproxy.cfg"
    config.write_text(RENDERED)
    ran = subprocess.run([str(launcher), "-db", "-f", str(config), "-sf", "123"], capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines()[0] == f"args: -db -f {config} -sf 123"
    binds = [line.strip() for line in config.read_text().splitlines() if line.strip().startswith("bind")]
    assert binds == [f"bind {host}:9101", "bind 127.0.0.1:8000", f"bind {host}:8404"]


def test_binds_are_left_alone_where_every_interface_is_wanted(tmp_path: Path) -> None:
    from tasks.rayserve import cluster

    for settings in (
        Settings(state_dir=tmp_path, serve={"host": "0.0.0.0"}),  # the user asked for every interface
        Settings(state_dir=tmp_path, ray={"local_only": False}),  # other hosts join this Ray
    ):
        launcher = cluster.write_haproxy_launcher(settings)
        assert launcher is not None
        assert "bind[[:space:]]" not in launcher.read_text()
        assert "haproxy-rules.sed" in launcher.read_text()  # cold starts are still bounded
    assert cluster.write_haproxy_launcher(Settings(state_dir=tmp_path, serve={"ingress": "proxy"})) is None
