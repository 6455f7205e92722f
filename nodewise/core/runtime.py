"""Point the libraries nodewise drives (Prefect, MLflow, Ray, torch) at the state folder.

Prefect, MLflow and Ray read their configuration from environment variables, some at import
time. ``configure_process`` writes them from the settings, once, before those imports, so that
nothing lands in the user's home directory.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from nodewise.core.settings import Settings

# The folder that holds the packages nodewise, flows, tasks and serving (the repository root of a
# checkout, site-packages of an install): subprocesses put it on PYTHONPATH, Ray ships serving/ from it.
SOURCE_ROOT = Path(__file__).resolve().parents[2]


def library_environment(settings: Settings) -> dict[str, str]:
    """The environment variables that keep every library's state inside ``settings.state_dir``."""
    env = {
        "PREFECT_HOME": str(settings.state.prefect_home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "MLFLOW_TRACKING_URI": settings.tracking_uri,
        "MLFLOW_REGISTRY_URI": settings.registry_uri,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(settings.mlflow.max_retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(settings.mlflow.timeout_s)),
        "TORCH_EXTENSIONS_DIR": str(settings.state.op_cache),
        "RAY_USAGE_STATS_ENABLED": "0",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if settings.prefect.api_url:
        env["PREFECT_API_URL"] = settings.prefect.api_url
    else:
        env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = str(settings.prefect.ephemeral_startup_timeout_s)
    if settings.ray.address is None:
        # Our own local Ray instance: token auth on, with the token inside the state folder.
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN_PATH"] = str(settings.state.ray_token)
        if settings.ray.local_only:
            # Ray's switch for a one-machine instance: its node address is 127.0.0.1, so the GCS,
            # raylet, agents and every worker listen on loopback (`ray start --node-ip-address=127.0.0.1`
            # alone is replaced by the machine's address).
            env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        env.update(serve_environment(settings))
        if settings.serve.ingress == "haproxy":
            # HAProxy through nodewise's launcher (written by `start_local_cluster`; see there).
            env["RAY_SERVE_HAPROXY_BINARY_PATH"] = str(settings.state.haproxy_launcher)
    return env


RECORD_INTERVAL_FACTOR = 0.1  # a replica's load sample every tenth of the look-back (1.2 s by default)


def serve_environment(settings: Settings) -> dict[str, str]:
    """Ray Serve's own switches for ingress and throughput. They are read when Ray Serve is
    imported, so every process of the cluster (controller, proxies, replicas) must start with
    them: nodewise passes them to the `ray start` of its local instance."""
    env = {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1" if settings.serve.throughput_optimized else "0",
        # each replica samples its load every look_back_period_s / 10 (Ray's default: / 5): nodewise's
        # policy reads the latest sample, so a step is seen within about a second
        "RAY_SERVE_AUTOSCALING_METRIC_RECORD_INTERVAL_FACTOR": str(RECORD_INTERVAL_FACTOR),
    }
    if settings.serve.ingress == "haproxy":
        env["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
        env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = str(settings.serve.drain_s)
        # A request whose replica dies before answering goes to another one (HAProxy's L7 retries,
        # with the `option redispatch 1` of Serve's config): `empty-response` is a replica that
        # closed without a byte of answer, `junk-response` one cut in its head. Nothing reached the
        # client, so sending it again is safe.
        retries = settings.serve.retries
        env["RAY_SERVE_HAPROXY_RETRY_ON"] = "conn-failure empty-response junk-response" if retries else "conn-failure"
        if retries:
            env["RAY_SERVE_HAPROXY_RETRIES"] = str(retries)
        hap = settings.state.haproxy
        env.update(
            {
                "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(hap / "haproxy.cfg"),
                "RAY_SERVE_HAPROXY_SOCKET_PATH": str(hap / "admin.sock"),
                "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(hap),
                "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(hap / "server-state"),
                "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(hap / "metrics.sock"),
            }
        )
    else:
        env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "0"
    return env


def haproxy_bind_host(settings: Settings) -> str | None:
    """Where HAProxy's stats and metrics pages should listen, when not on every interface: Serve's
    host, for a local instance whose Serve host is not a wildcard. (Ray's config template binds them
    to ``*``; the launcher script rewrites those two lines.)"""
    wildcard = settings.serve.host in ("0.0.0.0", "::", "")
    return None if wildcard or not settings.ray.local_only else settings.serve.host


def ensure_state_dir(settings: Settings) -> Path:
    """Create the state folder (and the Ray token) if missing; return its absolute path."""
    folder = settings.state
    state = folder.root
    for sub in (state, folder.artifacts, folder.prefect_home, folder.ray):
        sub.mkdir(parents=True, exist_ok=True)
    token = folder.ray_token
    if settings.ray.address is None and not token.exists():
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
    gitignore = state / ".gitignore"
    if not gitignore.exists():
        gitignore.write_text("*\n")
    return state


def configure_process(settings: Settings) -> None:
    """Create the state folder and export the library environment into this process."""
    ensure_state_dir(settings)
    os.environ.update(library_environment(settings))
