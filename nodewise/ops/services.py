"""``nodewise up``: the promotion pipeline on this machine, in one go, on 127.0.0.1 with SQLite.

Started, in order, each in its own session with its log in ``<state>/services/``:
1. ``prefect server`` (its own PREFECT_HOME), then the ``nodewise-local`` process work pool and
   ``prefect deploy --all`` (prefect.yaml: deploy-model with its promotion trigger, the watchdog);
2. ``mlflow server`` with webhooks on (a Fernet key and the webhook secret kept in the folder);
3. a Prefect worker for the pool, ``nodewise receiver`` for MLflow's webhooks, and ``nodewise exporter``
   (the control plane's Prometheus metrics, on loopback; none where ``metrics.exporter_port`` is 0);
4. the MLflow webhook (``model_version_alias.created`` -> the receiver), created once.
Their pids go to ``services.json``; ``nodewise down`` stops them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from pydantic import BaseModel, Field

from nodewise.core.errors import Busy, ServiceFailed
from nodewise.core.procs import port_open, session_members, stop_processes
from nodewise.core.runtime import SOURCE_ROOT
from nodewise.core.settings import Settings
from nodewise.core.state import read_json, write_json

POOL = "nodewise-local"


class Service(BaseModel):
    name: str
    pid: int
    url: str = ""
    log: str
    cmd: list[str] = []
    health: str = ""


class Services(BaseModel):
    prefect_api: str
    mlflow: str
    receiver: str
    services: list[Service]
    restarted: list[str] = Field(default=[], exclude=True, description="What this `up` started again.")

    def exports(self) -> dict[str, str]:
        """What a shell (or a flow run) needs to use them."""
        return {
            "NODEWISE_PREFECT__API_URL": self.prefect_api,
            "PREFECT_API_URL": self.prefect_api,
            "NODEWISE_MLFLOW__TRACKING_URI": self.mlflow,
            "NODEWISE_MLFLOW__REGISTRY_URI": self.mlflow,
            "MLFLOW_TRACKING_URI": self.mlflow,
            "MLFLOW_REGISTRY_URI": self.mlflow,
        }


def _secret(path: Path, make: str) -> str:
    if not path.exists():
        path.write_text(make)
        path.chmod(0o600)
    return path.read_text().strip()


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def read_services(settings: Settings) -> Services | None:
    data = read_json(settings.state.services / "services.json")
    return Services.model_validate(data) if data else None


def _webhook_secret(settings: Settings) -> str:
    given = settings.triggers.webhook_secret
    if given:
        return given.get_secret_value()
    return _secret(settings.state.services / "webhook.secret", secrets.token_hex(24))


def up(settings: Settings, timeout_s: float = 120.0) -> Services:
    """Start everything (see the module's docstring); ServiceFailed naming what did not start.

    Run again while it is up, it starts again only the services that have stopped (a crashed or
    killed Prefect server, say), with the same command, state and ports; Busy if none has."""
    from cryptography.fernet import Fernet

    from nodewise.core.runtime import ensure_state_dir

    running = read_services(settings)
    if running is not None:
        return _restart_stopped(settings, running, timeout_s)
    _check_ports(settings)
    folder = settings.state.services
    folder.mkdir(parents=True, exist_ok=True)
    t = settings.triggers
    fernet = _secret(folder / "fernet.key", Fernet.generate_key().decode())
    webhook_secret = _webhook_secret(settings)
    urls = Services(
        prefect_api=f"http://127.0.0.1:{t.prefect_port}/api",
        mlflow=f"http://127.0.0.1:{t.mlflow_port}",
        receiver=f"http://127.0.0.1:{t.receiver_port}/webhook",
        services=[],
    )
    ensure_state_dir(settings)
    env = _service_env(settings, urls, _webhook_secret(settings), fernet)
    started: list[Service] = []
    try:
        _start_all(settings, urls, env, started, timeout_s)
        _ensure_webhook(urls.mlflow, urls.receiver, webhook_secret)
    except BaseException:
        _stop(started)
        raise
    services = urls.model_copy(update={"services": started})
    write_json(folder / "services.json", services.model_dump(mode="json"))
    return services


def _check_ports(settings: Settings) -> None:
    t = settings.triggers
    for port, what in (
        (t.prefect_port, "TRIGGERS__PREFECT_PORT"),
        (t.mlflow_port, "TRIGGERS__MLFLOW_PORT"),
        (t.receiver_port, "TRIGGERS__RECEIVER_PORT"),
        (settings.metrics.exporter_port, "METRICS__EXPORTER_PORT"),
    ):
        if port_open("127.0.0.1", port):
            raise ServiceFailed(f"port {port} is in use; set NODEWISE_{what} to a free port")


def _service_env(settings: Settings, urls: Services, webhook_secret: str, fernet: str) -> dict[str, str]:
    """The services' environment: the library environment (flow runs reach the local Ray and its
    token as the CLI does), pointed at the Prefect and MLflow servers started here."""
    from nodewise.core.runtime import library_environment

    return {
        **os.environ,
        **library_environment(settings),
        "NODEWISE_STATE_DIR": str(settings.state_path),
        "PREFECT_HOME": str(settings.state.services / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "true",
        # The worker asks for runs every second instead of every 10: a promotion's run starts sooner
        # (measured in benchmarks/promotion_latency.py; one small query a second to a local server).
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "NODEWISE_PREFECT__API_URL": urls.prefect_api,
        "PREFECT_API_URL": urls.prefect_api,
        "NODEWISE_MLFLOW__TRACKING_URI": urls.mlflow,
        "NODEWISE_MLFLOW__REGISTRY_URI": urls.mlflow,
        "MLFLOW_TRACKING_URI": urls.mlflow,
        "MLFLOW_REGISTRY_URI": urls.mlflow,
        "NODEWISE_TRIGGERS__WEBHOOK_SECRET": webhook_secret,
        "NODEWISE_TRIGGERS__RECEIVER_PORT": str(settings.triggers.receiver_port),
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": fernet,
        # A delivery the receiver answers 5xx (502: Prefect did not take the event) is sent again.
        "MLFLOW_WEBHOOK_REQUEST_MAX_RETRIES": str(settings.triggers.webhook_retries),
    }


def _start_all(
    settings: Settings, urls: Services, env: dict[str, str], started: list[Service], timeout_s: float
) -> None:
    """Prefect server, MLflow server, work pool and deployments, worker, receiver; each appended to
    ``started`` as it starts (the caller stops them if a later one fails)."""
    folder, t = settings.state.services, settings.triggers
    prefect = [_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(t.prefect_port)]
    started.append(_start("prefect-server", prefect, env, folder, urls.prefect_api, f"{urls.prefect_api}/health"))
    _wait_http(started[-1].health, timeout_s, folder / "prefect-server.log")
    store = folder / "mlflow"
    store.mkdir(exist_ok=True)
    mlflow = [_bin("mlflow"), "server", "--backend-store-uri", f"sqlite:///{store}/mlflow.db"]
    mlflow += ["--default-artifact-root", f"file://{store}/artifacts", "--host", "127.0.0.1"]
    mlflow += ["--port", str(t.mlflow_port), "--workers", "1"]
    mlflow_env = _mlflow_server_env(env)
    started.append(_start("mlflow-server", mlflow, mlflow_env, folder, urls.mlflow, f"{urls.mlflow}/health"))
    _run([_bin("prefect"), "work-pool", "create", POOL, "--type", "process", "--overwrite"], env, folder)
    _run([_bin("prefect"), "--no-prompt", "deploy", "--all"], env, folder)
    started.append(_start("worker", [_bin("prefect"), "worker", "start", "--pool", POOL], env, folder))
    receiver_health = urls.receiver.replace("/webhook", "/health")
    started.append(_start("receiver", [_bin("nodewise"), "receiver"], env, folder, urls.receiver, receiver_health))
    exporter = ""
    if settings.metrics.exporter_port:  # the control plane's metrics, read from the state folder
        exporter = f"http://{settings.metrics.exporter_host}:{settings.metrics.exporter_port}/metrics"
        started.append(_start("exporter", [_bin("nodewise"), "exporter"], env, folder, exporter, exporter))
    _wait_http(f"{urls.mlflow}/health", timeout_s, folder / "mlflow-server.log")
    _wait_http(receiver_health, timeout_s, folder / "receiver.log")
    if exporter:
        _wait_http(exporter, timeout_s, folder / "exporter.log")


def _mlflow_server_env(env: dict[str, str]) -> dict[str, str]:
    """The MLflow server's: not the clients' MLFLOW_TRACKING_URI/REGISTRY_URI (the server would look
    its webhooks up there)."""
    return {k: v for k, v in env.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}


def down(settings: Settings) -> list[str]:
    """Stop what ``up`` started (nothing else)."""
    services = read_services(settings)
    if services is None:
        return []
    _stop(services.services)
    (settings.state.services / "services.json").unlink()
    return [f"stopped {s.name}" for s in reversed(services.services)]


def _start(name: str, cmd: list[str], env: dict[str, str], folder: Path, url: str = "", health: str = "") -> Service:
    log = folder / f"{name}.log"
    with log.open("a") as out:  # a restart appends: the log of the run that stopped stays readable
        proc = subprocess.Popen(
            cmd, env=env, cwd=SOURCE_ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Service(name=name, pid=proc.pid, url=url, log=str(log), cmd=cmd, health=health)


def _running(service: Service) -> bool:
    import psutil

    try:  # still the process `up` started: alive, leading its own session, running that program
        proc = psutil.Process(service.pid)
        program = Path(service.cmd[0]).name if service.cmd else service.name
        return (
            proc.status() != psutil.STATUS_ZOMBIE
            and os.getsid(service.pid) == service.pid
            and any(Path(part).name == program for part in proc.cmdline())
        )
    except (psutil.Error, OSError):
        return False


def _restart_stopped(settings: Settings, running: Services, timeout_s: float) -> Services:
    """Start again the recorded services that are no longer running (see ``up``)."""
    stopped = [s for s in running.services if not _running(s)]
    if not stopped:
        raise Busy("`nodewise up` already runs for this state folder (every service is running); `nodewise down` first")
    if any(not s.cmd for s in stopped):
        raise Busy("these services were started by an older nodewise: run `nodewise down`, then `nodewise up`")
    folder = settings.state.services
    env = _service_env(settings, running, _webhook_secret(settings), (folder / "fernet.key").read_text().strip())
    restarted = []
    for old in stopped:
        service_env = _mlflow_server_env(env) if old.name == "mlflow-server" else env
        new = _start(old.name, old.cmd, service_env, folder, old.url, old.health)
        if new.health:
            _wait_http(new.health, timeout_s, Path(new.log))
        restarted.append(new)
    by_name = {s.name: s for s in restarted}
    services = running.model_copy(update={"services": [by_name.get(s.name, s) for s in running.services]})
    write_json(folder / "services.json", services.model_dump(mode="json"))
    return services.model_copy(update={"restarted": [s.name for s in restarted]})


def _run(cmd: list[str], env: dict[str, str], folder: Path) -> None:
    log = folder / "setup.log"
    with log.open("a") as out:
        done = subprocess.run(
            cmd, env=env, cwd=SOURCE_ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=300, check=False
        )
    if done.returncode != 0:
        raise ServiceFailed(f"`{Path(cmd[0]).name} {' '.join(cmd[1:])}` failed; see {log}")


def _wait_http(url: str, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise ServiceFailed(f"{url} did not answer within {timeout_s:.0f} s; see {log}")


def _ensure_webhook(mlflow: str, receiver: str, secret: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow, registry_uri=mlflow)
    if any(w.url == receiver for w in client.list_webhooks()):
        return
    # an alias set (a promotion) and a new version (profiled at once, so its promotion is quick)
    events = ["model_version_alias.created", "model_version.created"]
    client.create_webhook("nodewise-promotions", receiver, events=events, secret=secret)


def _stop(services: list[Service], grace_s: float = 15.0) -> None:
    """SIGINT each service's session (a Prefect worker wants it twice), then SIGTERM, then SIGKILL."""
    for service in reversed(services):
        session = service.pid  # started with start_new_session: its pid is its session id
        stop_processes(
            lambda sid=session: session_members(sid), grace_s, (signal.SIGINT, signal.SIGINT, signal.SIGTERM)
        )
