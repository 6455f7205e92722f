"""Registry promotions end to end on real servers: `nodewise up` (Prefect server, work pool,
deployments, worker, MLflow server with webhooks, receiver), then aliases set through MLflow.

Setting `champion` makes that version serve; two quick promotions end with the newest serving
and `previous` on the one it replaced; a version that cannot load fails its deploy, the
previous version keeps serving, and the failure is recorded and sent as an event. A DeepSpeed
job's exit event runs the watchdog through prefect.yaml's trigger. Faults of the
pipeline itself: the Prefect server down when a webhook arrives (502, MLflow sends it again, one
deploy once Prefect is back), the registry down during a watchdog pass, and two CLI deploys of
one model at once."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from nodewise.core.procs import free_port_block
from nodewise.ops.processes import remove_state
from testkit import read_events, wait_for_events
from testkit.cli import NODEWISE, user_environment
from testkit.registrar import Registrar
from testkit.wait import wait_until

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pipeline() -> Iterator[tuple[Path, dict[str, str], str, str]]:
    state, env = user_environment("nw-up-")
    base = free_port_block(4)
    env.update(
        {
            "NODEWISE_TRIGGERS__PREFECT_PORT": str(base),
            "NODEWISE_TRIGGERS__MLFLOW_PORT": str(base + 1),
            "NODEWISE_TRIGGERS__RECEIVER_PORT": str(base + 2),
            "NODEWISE_METRICS__EXPORTER_PORT": str(base + 3),
        }
    )
    mlflow = f"http://127.0.0.1:{base + 1}"
    try:
        up = subprocess.run([NODEWISE, "up"], env=env, capture_output=True, text=True, timeout=600, check=False)
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"export NODEWISE_MLFLOW__TRACKING_URI={mlflow}" in up.stdout
        yield state, env, mlflow, f"http://127.0.0.1:{base}/api"
    finally:
        down = subprocess.run([NODEWISE, "down"], env=env, capture_output=True, text=True, timeout=300, check=False)
        print(down.stdout, down.stderr)
        remove_state(state)


def register(registrar: Registrar, mlflow: str, state: Path, what: str) -> str:
    """Register a version of nodewise-digits through the MLflow server (from another process: a
    user's script); ``what``: ``digits`` (a retrained demo model) or ``broken`` (fails to load)."""
    kind = {"digits": "demo-retrained", "broken": "broken-on-load"}[what]
    return registrar.register(kind, mlflow, str(state / "services" / "mlflow" / "artifacts"))


def served(endpoint: str) -> str | None:
    try:
        return httpx.get(f"{endpoint}/version", timeout=2).json().get("version")
    except (httpx.HTTPError, ValueError):
        return None


def wait_served(endpoint: str, version: str, timeout_s: float = 300) -> float:
    started = time.monotonic()
    while served(endpoint) != version:
        assert time.monotonic() - started < timeout_s, f"version {version} not served after {timeout_s:.0f} s"
        time.sleep(0.5)
    return time.monotonic() - started


def promotions(state: Path) -> list[dict]:
    path = state / "promotions.json"
    return json.loads(path.read_text())["history"] if path.exists() else []


def test_promotions_deploy_the_newest_and_a_broken_version_leaves_the_previous_serving(
    pipeline: tuple[Path, dict[str, str], str, str], registrar: Registrar
) -> None:
    from mlflow import MlflowClient

    state, env, mlflow, prefect_api = pipeline
    client = MlflowClient(tracking_uri=mlflow, registry_uri=mlflow)
    endpoint = f"http://127.0.0.1:{env['NODEWISE_SERVE__PORT']}/nodewise-digits"

    v1 = register(registrar, mlflow, state, "digits")
    client.set_registered_model_alias("nodewise-digits", "champion", v1)
    print(f"first promotion served after {wait_served(endpoint, v1):.1f} s (Ray started on the way)")

    v2, v3 = register(registrar, mlflow, state, "digits"), register(registrar, mlflow, state, "digits")
    client.set_registered_model_alias("nodewise-digits", "champion", v2)
    client.set_registered_model_alias("nodewise-digits", "champion", v3)  # right after: the newest must win
    wait_served(endpoint, v3)
    time.sleep(15)  # the second run (or the first, if it saw v2) has finished: nothing moves back
    assert served(endpoint) == v3
    assert client.get_model_version_by_alias("nodewise-digits", "previous").version in (v1, v2)

    broken = register(registrar, mlflow, state, "broken")
    client.set_registered_model_alias("nodewise-digits", "champion", broken)
    deadline = time.monotonic() + 300
    while not any(p["version"] == broken for p in promotions(state)):
        assert time.monotonic() < deadline, promotions(state)
        time.sleep(1)
    [failure] = [p for p in promotions(state) if p["version"] == broken]
    assert failure["outcome"].startswith("failed: "), failure
    assert served(endpoint) == v3  # the previous version keeps serving
    # The run sends its event as it ends: give it a moment.
    events = wait_for_events(["nodewise.deploy.failed"], timeout_s=60, api_url=prefect_api)
    assert [e["payload"]["version"] for e in events] == [broken]
    assert events[0]["payload"]["still_serving"] == v3
    # `nodewise up`'s exporter: the promotion's duration and the deployment's state, from the state folder
    scraped = httpx.get(f"http://127.0.0.1:{env['NODEWISE_METRICS__EXPORTER_PORT']}/metrics", timeout=30).text
    serving = 'app="nodewise-digits",backend="ray_serve",model="nodewise-digits",state="serving"'
    assert f"nodewise_deployment_state{{{serving}}} 1.0" in scraped
    assert 'nodewise_promotion_duration_seconds{model="nodewise-digits"}' in scraped
    # the deploy wrote its scrape targets; while the broken version's replicas came and went a
    # watchdog pass can have found none running: the next passes (every 30 s) list v3's again
    path = state / "prometheus" / "targets" / "serving" / "nodewise-digits.json"
    targets = wait_until(
        lambda: json.loads(path.read_text()), 120, "a scrape target for each running replica", seen=path.read_text
    )
    assert all(g["labels"]["app"] == "nodewise-digits" for g in targets)


def test_a_job_that_exits_runs_the_watchdog_at_once_through_prefect_yamls_trigger(
    pipeline: tuple[Path, dict[str, str], str, str],
) -> None:
    """What mpirun's supervisor posts when a job dies (tasks/mpi/supervise.py) starts a watchdog run
    through the trigger `nodewise up` deployed from prefect.yaml, not at the next scheduled pass."""
    from datetime import UTC, datetime

    from tasks.mpi.supervise import exited_event, post_event

    _, _, _, prefect_api = pipeline
    watch = httpx.get(f"{prefect_api}/deployments/name/watch-deployments/watch-deployments", timeout=10).json()
    posted = time.time()
    assert post_event(prefect_api, exited_event("nodewise-tiny-llama", 137, ["127.0.0.1"], datetime.now(UTC))) is None
    deadline = time.monotonic() + 180
    while True:
        runs = httpx.post(
            f"{prefect_api}/flow_runs/filter",
            json={"deployments": {"id": {"any_": [watch["id"]]}}, "limit": 50},
            timeout=30,
        ).json()
        triggered = [r for r in runs if not r["auto_scheduled"] and _epoch(r["created"]) >= posted - 1]
        if triggered and triggered[0]["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            break
        assert time.monotonic() < deadline, [(r["name"], r["state_type"], r["auto_scheduled"]) for r in runs]
        time.sleep(0.5)
    [run] = triggered
    assert run["state_type"] == "COMPLETED", run["state"]
    print(
        f"exited event -> watchdog run created {_epoch(run['created']) - posted:.1f} s, "
        f"started {_epoch(run['start_time']) - posted:.1f} s, finished {_epoch(run['end_time']) - posted:.1f} s"
    )


def _epoch(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp).timestamp()


def prefect_records(prefect_api: str) -> dict[str, str]:
    """Everything the Prefect server keeps of nodewise's runs, as text: flow runs (with their
    parameters), task runs, logs, artifacts and events."""
    texts = {}
    for kind in ("flow_runs", "task_runs", "logs", "artifacts"):
        answer = httpx.post(f"{prefect_api}/{kind}/filter", json={"limit": 200}, timeout=30)
        assert answer.status_code == 200, answer.text
        texts[kind] = answer.text
    texts["events"] = json.dumps(read_events(api_url=prefect_api))
    return texts


def test_cli_deploys_reach_the_users_prefect_and_no_secret_is_stored(
    pipeline: tuple[Path, dict[str, str], str, str], tmp_path: Path, registrar: Registrar
) -> None:
    state, env, mlflow, prefect_api = pipeline
    secret = (state / "services" / "webhook.secret").read_text().strip()
    user = {
        **env,
        "NODEWISE_PREFECT__API_URL": prefect_api,
        "NODEWISE_MLFLOW__TRACKING_URI": mlflow,
        "NODEWISE_TRIGGERS__WEBHOOK_SECRET": secret,
    }
    version = register(registrar, mlflow, state, "digits")
    deploy = subprocess.run(
        [NODEWISE, "deploy", f"models:/nodewise-digits/{version}"],
        env=user,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    runs = httpx.post(f"{prefect_api}/flow_runs/filter", json={"limit": 200}, timeout=30).json()
    uris = [r["parameters"].get("model_uri") for r in runs]
    assert f"models:/nodewise-digits/{version}" in uris  # the CLI's run is in the user's Prefect, not a temporary one
    assert all("settings" not in r["parameters"] for r in runs)
    out = tmp_path / "k8s"
    render = subprocess.run(
        [NODEWISE, "render", f"models:/nodewise-digits/{version}", "--out", str(out), "--inventory",
         str(ROOT / "deployments/inventory/gpu-cluster.yaml"), "--allow-local"],
        env=user, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert render.returncode == 0, render.stderr
    stored = {
        **prefect_records(prefect_api),
        "deployments.json": (state / "deployments.json").read_text(),
        "promotions.json": (state / "promotions.json").read_text(),
        **{p.name: p.read_text() for p in out.iterdir()},
        "cli output": deploy.stdout + deploy.stderr + render.stdout + render.stderr,
    }
    assert len(stored["flow_runs"]) > 1000  # there is something to look through
    assert [where for where, text in stored.items() if secret in text] == []


def service(state: Path, name: str) -> dict:
    services = json.loads((state / "services" / "services.json").read_text())["services"]
    return next(s for s in services if s["name"] == name)


def stop_service(state: Path, name: str) -> None:
    """Kill one of `nodewise up`'s services (its whole session), as a crash would."""
    import psutil

    sid = service(state, name)["pid"]
    members = [p for p in psutil.process_iter() if _session(p.pid) == sid]
    for proc in members:
        proc.kill()
    psutil.wait_procs(members, timeout=30)


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def deploy_runs(prefect_api: str, uri: str) -> list[dict]:
    runs = httpx.post(f"{prefect_api}/flow_runs/filter", json={"limit": 200}, timeout=30).json()
    return [r for r in runs if r["parameters"].get("model_uri") == uri]


def test_prefect_down_when_the_webhook_arrives_gives_502_then_exactly_one_deploy(
    pipeline: tuple[Path, dict[str, str], str, str], registrar: Registrar
) -> None:
    from mlflow import MlflowClient

    state, env, mlflow, prefect_api = pipeline
    client = MlflowClient(tracking_uri=mlflow, registry_uri=mlflow)
    endpoint = f"http://127.0.0.1:{env['NODEWISE_SERVE__PORT']}/nodewise-digits"
    version = register(registrar, mlflow, state, "digits")
    receiver_log = Path(service(state, "receiver")["log"])
    refused_before = receiver_log.read_text().count("not passed on")

    stop_service(state, "prefect-server")
    client.set_registered_model_alias("nodewise-digits", "champion", version)
    deadline = time.monotonic() + 60
    while receiver_log.read_text().count("not passed on") < refused_before + 2:  # 502, and MLflow sent it again
        assert time.monotonic() < deadline, receiver_log.read_text()[-2000:]
        time.sleep(0.5)
    assert served(endpoint) != version  # nothing deployed while Prefect was down

    up = subprocess.run([NODEWISE, "up"], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "started again what had stopped: prefect-server; the others kept running" in up.stdout
    print(f"served {wait_served(endpoint, version, timeout_s=300):.1f} s after Prefect came back")
    time.sleep(10)  # a second delivery's run, had there been one, would have started by now
    assert len(deploy_runs(prefect_api, f"models:/nodewise-digits/{version}")) == 1
    assert [p["version"] for p in promotions(state)].count(version) == 1


def test_the_watchdog_with_the_registry_down_changes_nothing(pipeline: tuple[Path, dict[str, str], str, str]) -> None:
    state, env, mlflow, prefect_api = pipeline
    endpoint = f"http://127.0.0.1:{env['NODEWISE_SERVE__PORT']}/nodewise-digits"
    before = served(endpoint)
    records = (state / "deployments.json").read_text()
    stop_service(state, "mlflow-server")
    user = {**env, "NODEWISE_PREFECT__API_URL": prefect_api, "NODEWISE_MLFLOW__TRACKING_URI": mlflow}
    watch = subprocess.run(
        [NODEWISE, "watchdog", "--once"], env=user, capture_output=True, text=True, timeout=300, check=False
    )
    assert watch.returncode == 0, watch.stdout + watch.stderr
    assert "Traceback" not in watch.stdout + watch.stderr
    assert served(endpoint) == before  # the watchdog needs no registry: it checks what is deployed
    assert (state / "deployments.json").read_text() == records
    up = subprocess.run([NODEWISE, "up"], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert "started again what had stopped: mlflow-server; the others kept running" in up.stdout, up.stdout


def test_two_cli_deploys_of_one_model_at_once_end_consistent(
    pipeline: tuple[Path, dict[str, str], str, str], registrar: Registrar
) -> None:
    state, env, mlflow, prefect_api = pipeline
    endpoint = f"http://127.0.0.1:{env['NODEWISE_SERVE__PORT']}/nodewise-digits"
    user = {**env, "NODEWISE_PREFECT__API_URL": prefect_api, "NODEWISE_MLFLOW__TRACKING_URI": mlflow}
    first, second = register(registrar, mlflow, state, "digits"), register(registrar, mlflow, state, "digits")
    procs = [
        subprocess.Popen(
            [NODEWISE, "deploy", f"models:/nodewise-digits/{v}"],
            env=user,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for v in (first, second)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert sum("this one waits for it, then deploys" in out for out in outputs) == 1, outputs
    record = json.loads((state / "deployments.json").read_text())["nodewise-digits"]
    assert served(endpoint) == record["model_version"]  # what is recorded is what serves
    assert {record["model_version"], record["previous_version"]} == {first, second}
