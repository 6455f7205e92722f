"""The script Serve starts HAProxy through (tasks/rayserve/cluster.py): it bounds cold starts and
moves HAProxy's pages off the wildcard address, and the config it leaves is one HAProxy accepts.

The config is a trimmed copy of one Ray Serve 2.60 generated here (tests/fixtures/haproxy); the
HAProxy is the one ray[serve] ships, run with ``-c`` (check the config, start nothing)."""

import shutil
import subprocess
from pathlib import Path

from nodewise.core.settings import Settings
from tasks.rayserve.cluster import write_haproxy_launcher

FIXTURE = Path(__file__).parents[1] / "fixtures" / "haproxy" / "serve.cfg"


def sections(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    current = ""
    for line in text.splitlines():
        if line and not line[0].isspace():
            current = line
            out[current] = []
        else:
            out.setdefault(current, []).append(line.strip())
    return out


def test_the_launcher_bounds_cold_starts_in_model_backends_only_and_haproxy_accepts_it(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path / "state", serve={"cold_start_timeout_s": 45})
    launcher = write_haproxy_launcher(settings)
    assert launcher is not None
    cfg = tmp_path / "haproxy.cfg"
    shutil.copy(FIXTURE, cfg)
    for _ in range(2):  # Serve may start HAProxy again on the same file: edited once
        checked = subprocess.run([str(launcher), "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    parts = sections(cfg.read_text())
    model = parts["backend http-a"]
    assert (
        "http-request set-var(txn.nodewise_cold) bool(true) if { nbsrv() le 1 } { lua.nodewise_replicas_up eq 0 }"
        in model
    )
    assert (
        "http-request set-header x-request-timeout-seconds 45 if { var(txn.nodewise_cold) -m bool } "
        "!{ req.hdr(x-request-timeout-seconds) -m found }"
    ) in model
    [answer] = [line for line in model if line.startswith("http-response return status 503")]
    assert "hdr Retry-After 5" in answer
    assert "within 45 s" in answer
    assert sum("nodewise_cold" in line for line in cfg.read_text().splitlines()) == 3  # not twice
    assert not any("nodewise" in line for line in parts["backend default_backend"])
    assert any(line.startswith("lua-load-per-thread ") for line in parts["global"])
    # the stats and metrics pages moved to Serve's host (127.0.0.1 by default)
    assert "bind 127.0.0.1:8404" in parts["listen stats"]
    assert "bind 127.0.0.1:9101" in parts["frontend prometheus"]
    # serve.retries (2 by default): HAProxy holds a whole request, so it can send it to another replica
    assert parts["defaults"].count("option http-buffer-request") == 1
    # a replica's host gone silent is found dead (TCP keepalive, TCP_USER_TIMEOUT: 15 s), its request resent
    assert [line for line in parts["defaults"] if line.startswith("srvtcpka") or line == "option srvtcpka"] == [
        "option srvtcpka",
        "srvtcpka-idle 2s",
        "srvtcpka-intvl 1s",
        "srvtcpka-cnt 13",
    ]
    servers = [line for line in model if line.startswith("server ")]
    assert len(servers) == 2  # the replica and the backup (Serve's proxy) ...
    assert all(line.endswith(" tcp-ut 15s") and line.count(" tcp-ut ") == 1 for line in servers)  # ... each once


def test_without_retries_requests_are_not_buffered(tmp_path: Path) -> None:
    launcher = write_haproxy_launcher(Settings(state_dir=tmp_path / "state", serve={"retries": 0}))
    assert launcher is not None
    cfg = tmp_path / "haproxy.cfg"
    shutil.copy(FIXTURE, cfg)
    checked = subprocess.run([str(launcher), "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "http-buffer-request" not in cfg.read_text()
    assert "option srvtcpka" in sections(cfg.read_text())["defaults"]  # a dead peer still found, its 502 soon


def test_an_existing_cluster_or_the_python_proxy_gets_no_launcher(tmp_path: Path) -> None:
    assert write_haproxy_launcher(Settings(state_dir=tmp_path, serve={"ingress": "proxy"})) is None
    assert write_haproxy_launcher(Settings(state_dir=tmp_path, ray={"address": "10.0.0.1:6379"})) is None
