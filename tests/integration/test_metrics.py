"""Metrics scraped for real: a real Prometheus (Debian's package) reads nodewise's targets.

A tiny Llama serves on both backends: Ray Serve (two replicas, the batching engine in each) and
DeepSpeed (two ranks under mpirun). The control-plane exporter runs as ``nodewise up`` runs it.
Prometheus discovers every endpoint from the files nodewise writes (file-based service discovery,
the shipped ``deployments/prometheus/prometheus.yml``), scrapes them every second, and its HTTP
API is asked what it saw: request counts equal to the traffic sent, time to first token observed
on both backends, the gateway's gauges, a replica killed and replaced (its target follows, the
replacement is counted), and every panel of the shipped dashboard returning data.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from nodewise.core.settings import Settings
from testkit.flows import deploy_model
from testkit.lm import deploy_on_two_ranks, register_tiny_llama
from tests.integration.conftest import free_port_block, module_settings

ROOT = Path(__file__).resolve().parents[2]
SERVED, SHARDED = "tiny-llama", "tiny-llama-tp"
pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus is not installed")


@pytest.fixture(scope="module")
def settings(prefect_harness: None) -> Iterator[Settings]:
    yield from module_settings(
        serve={"max_batch_size": 4, "replicas": 2, "max_new_tokens": 32},
        deepspeed={"ready_timeout_s": 400},
        metrics={"exporter_port": free_port_block(1), "refresh_s": 1.0},
    )


@pytest.fixture(scope="module")
def deployed(settings: Settings) -> tuple[object, object]:
    serve = deploy_model(register_tiny_llama(settings, "metrics-tests", name=SERVED), settings=settings)
    sharded = deploy_on_two_ranks(settings, register_tiny_llama(settings, "metrics-tests", seed=1, name=SHARDED))
    return serve, sharded


@pytest.fixture(scope="module")
def exporter(settings: Settings, deployed: object) -> Iterator[str]:
    from tasks.metrics.exporter import run

    stop = threading.Event()
    thread = threading.Thread(target=run, args=(settings, stop), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{settings.metrics.exporter_port}/metrics"
    wait_until(lambda: _answers(url), "the exporter answers")
    yield url
    stop.set()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def prometheus(settings: Settings, exporter: str) -> Iterator[str]:
    """The shipped config, pointed at this module's state folder and scraping every second."""
    config = yaml.safe_load((ROOT / "deployments/prometheus/prometheus.yml").read_text())
    config["global"] = {**config.get("global", {}), "scrape_interval": "1s", "evaluation_interval": "1s"}
    for job in config["scrape_configs"]:
        for sd in job.get("file_sd_configs", []):
            sd["files"] = [f.replace("STATE_DIR", str(settings.state_path)) for f in sd["files"]]
            sd["refresh_interval"] = "1s"
    config["rule_files"] = [str(ROOT / "deployments/prometheus" / Path(f).name) for f in config.get("rule_files", [])]
    folder = Path(tempfile.mkdtemp(prefix="nw-prom-"))
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port_block(1)
    log = (folder / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(f"{url}/-/ready"), "prometheus is ready", timeout_s=60)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until(check: object, what: str, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not within {timeout_s:.0f} s: {what}"
        time.sleep(0.5)


def query(prom: str, promql: str) -> list[dict]:
    answer = httpx.get(f"{prom}/api/v1/query", params={"query": promql}, timeout=10).json()
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def scalar(prom: str, promql: str) -> float | None:
    result = query(prom, promql)
    return float(result[0]["value"][1]) if result else None


def eventually(prom: str, promql: str, want: float, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (got := scalar(prom, promql)) != want:
        assert time.monotonic() < deadline, f"{promql} = {got}, expected {want}"
        time.sleep(0.5)


def send_traffic(endpoint: str, completions: int, streams: int) -> None:
    body = {"model": "m", "prompt": "nodewise serves", "max_tokens": 8, "temperature": 0}
    for _ in range(completions):
        model = httpx.get(f"{endpoint}/v1/models", timeout=30).json()["data"][0]["id"]
        answer = httpx.post(f"{endpoint}/v1/completions", json={**body, "model": model}, timeout=60)
        assert answer.status_code == 200, answer.text
    for _ in range(streams):
        with httpx.stream("POST", f"{endpoint}/v1/completions", json={**body, "model": model, "stream": True}) as s:
            assert s.status_code == 200
            assert b"[DONE]" in b"".join(s.iter_bytes())


def test_prometheus_finds_every_endpoint_from_the_targets_nodewise_writes(
    settings: Settings, deployed: tuple[object, object], prometheus: str
) -> None:
    from tasks.metrics.targets import read_targets
    from tasks.watchdog.engine import watch_once

    watch_once(settings)  # the watchdog's pass: each replica's address, from its vitals
    files = read_targets(settings)
    assert set(files) == {"control/control.json", f"serving/{SERVED}.json", f"serving/{SHARDED}.json"}
    assert len(files[f"serving/{SERVED}.json"]) == 2  # a group per replica
    eventually(prometheus, 'count(up{job="nodewise-serving", app="tiny-llama"} == 1)', 2)
    eventually(prometheus, 'count(up{job="nodewise-serving", app="tiny-llama-tp"} == 1)', 1)
    eventually(prometheus, 'count(up{job="nodewise-control"} == 1)', 1)


def test_request_counts_match_the_traffic_sent_on_both_backends(
    deployed: tuple[object, object], prometheus: str
) -> None:
    serve, sharded = deployed
    for endpoint, app in ((serve.endpoint, SERVED), (sharded.endpoint, SHARDED)):  # type: ignore[attr-defined]
        send_traffic(endpoint, completions=6, streams=3)
        counted = f'sum(nodewise_requests_total{{app="{app}", route="/v1/completions", status="200"}})'
        eventually(prometheus, counted, 9)
        eventually(prometheus, f'sum(nodewise_requests_total{{app="{app}", route="/v1/models"}})', 6)
        # and the smoke test's and the watchdog's canaries, which go through the engine too
        assert scalar(prometheus, f'sum(nodewise_time_to_first_token_seconds_count{{app="{app}"}})') >= 9
        assert scalar(prometheus, f'sum(nodewise_generation_tokens_total{{app="{app}"}})') >= 9
        assert scalar(prometheus, f'sum(nodewise_inter_token_latency_seconds_count{{app="{app}"}})') > 0
        # the Gateway API Inference Extension's names, with model_name
        for gauge in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"):
            series = query(prometheus, f'{{__name__="{gauge}", app="{app}"}}')
            assert series, gauge
            assert all(s["metric"]["model_name"] == app for s in series)
            assert all(0.0 <= float(s["value"][1]) <= (1.0 if "perc" in gauge else 64) for s in series)
        assert scalar(prometheus, f'sum(nodewise_token_budget{{app="{app}"}}) > 0') is not None
        backend = "ray_serve" if app == SERVED else "deepspeed_mpi"
        assert query(prometheus, f'nodewise_model_info{{app="{app}", backend="{backend}"}}')


def test_every_endpoint_passes_promtool_and_labels_stay_bounded(settings: Settings, prometheus: str) -> None:
    from tasks.metrics.targets import read_targets

    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed")
    allowed = {
        f"vllm:{n} metric names should not contain ':'"
        for n in ("num_requests_waiting", "num_requests_running", "kv_cache_usage_perc")
    }
    addresses = [t for groups in read_targets(settings).values() for g in groups for t in g["targets"]]
    assert len(addresses) == 4
    for address in addresses:
        text = httpx.get(f"http://{address}/metrics", timeout=10).text
        done = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        problems = [p for p in (done.stdout + done.stderr).splitlines() if p.strip() and p not in allowed]
        assert problems == [], (address, problems)
    # nothing a client sent became a label: routes from the fixed list only
    routes = {s["metric"]["route"] for s in query(prometheus, "nodewise_requests_total")}
    from serving.metrics import ROUTES

    assert routes <= {*ROUTES, "other"}


def test_a_killed_replica_is_replaced_counted_and_its_target_follows(
    settings: Settings, deployed: tuple[object, object], prometheus: str
) -> None:
    from tasks.metrics.targets import read_targets
    from tasks.rayserve.replicas import replicas_of
    from tasks.watchdog.engine import watch_once

    watch_once(settings)  # knows both replicas
    before = {g["labels"]["replica"]: g["targets"][0] for g in read_targets(settings)[f"serving/{SERVED}.json"]}
    victim = next(r for r in replicas_of(SERVED) or [] if r["state"] == "RUNNING")
    os.kill(victim["pid"], signal.SIGKILL)
    eventually(prometheus, f'up{{replica="{victim["replica_id"]}"}}', 0)  # Prometheus sees it go

    def replaced() -> bool:
        running = [r for r in replicas_of(SERVED) or [] if r["state"] == "RUNNING"]
        return len(running) == 2 and victim["replica_id"] not in {r["replica_id"] for r in running}

    wait_until(replaced, "Serve replaced the replica", timeout_s=120)
    actions = watch_once(settings)
    assert [(a.event, a.target) for a in actions if a.event == "nodewise.replica.replaced"] == [
        ("nodewise.replica.replaced", f"replica {victim['replica_id']}")
    ]
    after = {g["labels"]["replica"]: g["targets"][0] for g in read_targets(settings)[f"serving/{SERVED}.json"]}
    assert victim["replica_id"] not in after
    assert len(after) == 2
    assert set(after) != set(before)
    eventually(prometheus, 'count(up{job="nodewise-serving", app="tiny-llama"} == 1)', 2)
    counted = 'sum(nodewise_watchdog_actions_total{app="tiny-llama", kind="replica_replaced", cause="exited"})'
    eventually(prometheus, counted, 1)
    eventually(prometheus, 'nodewise_deployment_state{app="tiny-llama", state="serving"}', 1)
    eventually(prometheus, 'nodewise_restart_budget_remaining{app="tiny-llama"}', settings.watchdog.max_restarts)
    # nodewise status reads the same endpoints: its live line for the app
    from nodewise.ops.status import deployment_status

    rows = {r["app"]: r for r in deployment_status(settings)["deployments"]}
    traffic = rows[SERVED]["traffic"]
    assert (traffic["restarts"], traffic["targets"], traffic["answering"]) == (1, 2, 2)
    assert traffic["p99_s"] is not None  # since start: the traffic of the earlier test
    assert rows[SHARDED]["traffic"]["answering"] == 1


def test_every_dashboard_panel_returns_data_and_the_alert_rules_load(settings: Settings, prometheus: str) -> None:
    from tasks.metrics.dashboard import panel_queries
    from tasks.rollout import store
    from tasks.rollout.policy import Rollout

    # What a rollout leaves in the state folder, written by the functions its flow calls (a whole
    # rollout runs in test_rollout.py; here Prometheus needs only its figures to be there).
    rollout = Rollout(
        model_name=SERVED,
        app_name=SERVED,
        challenger_app=f"{SERVED}--challenger",
        champion_version="1",
        challenger_version="2",
        mode="canary",
        shares=[0.05, 0.25],
        rules=settings.rollout,
        last={"summary": {"challenger_calls": 200, "challenger_errors": 1, "rows_compared": 10, "rows_agreeing": 10}},
    )
    store.save(settings.state.rollouts, rollout)
    store.count_outcome(settings.state.prometheus, SERVED, "rolled_back")
    empty = []
    deadline = time.monotonic() + 45
    for title, promql in panel_queries(ROOT / "deployments/grafana/nodewise.json"):
        while not query(prometheus, promql) and time.monotonic() < deadline:
            time.sleep(1)
        if not query(prometheus, promql):
            empty.append((title, promql))
    assert empty == []
    rules = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = [r for g in rules for r in g["rules"]]
    assert loaded, "no alert rule loaded"
    assert [r["name"] for r in loaded if r["health"] != "ok"] == []
    # the figures the closing note reports: series per deployment, each endpoint's scrape time
    for app in (SERVED, SHARDED):
        series = scalar(prometheus, f'count({{job="nodewise-serving", app="{app}"}})')
        print(f"series of {app}: {series:.0f}")
    for s in query(prometheus, 'scrape_duration_seconds{job=~"nodewise.*"}'):
        where, ms = f"{s['metric'].get('app', 'control')} {s['metric']['instance']}", float(s["value"][1]) * 1000
        print(f"scrape of {where}: {ms:.1f} ms")
