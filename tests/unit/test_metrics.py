"""The metrics' schema, what a serving process and the control-plane exporter expose, and the targets.

Scrapes are read back with prometheus_client's own parser and linted with ``promtool check metrics``
(Debian's prometheus package, installed by scripts/setup.sh).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nodewise.core.settings import Settings
from nodewise.core.state import write_json
from serving.metrics import BY_NAME, SCHEMA, EngineLoad, ServingMetrics, route_label, serve_metrics
from tasks.metrics import counts, targets
from tasks.metrics.exporter import registry_for
from tasks.records import DeploymentRecord

GATEWAY = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc")


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    found = [v for (n, ls), v in samples(text).items() if n == name and labels.items() <= dict(ls).items()]
    assert found, f"no {name} {labels} in:\n{text}"
    return sum(found)


def promtool_problems(text: str) -> list[str]:
    """``promtool check metrics``'s findings, but the one nodewise chose: the gateway's ``vllm:`` names
    have colons (the Inference Extension reads those exact names; Prometheus' lint keeps colons for
    recording rules)."""
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (scripts/setup.sh installs Debian's prometheus package)")
    done = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, check=False)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    expected = {f"{name} metric names should not contain ':'" for name in GATEWAY}
    return [line for line in lines if line not in expected and line != "All checks passed!"]


def llm_metrics() -> ServingMetrics:
    m = ServingMetrics("tiny-llama", "3", "deepspeed_mpi", latency_target_s=0.5)
    m.add_engine(lambda: EngineLoad(running=3, waiting=2, tokens_in_flight=96, token_budget=512, blocked=1))
    return m


def test_every_name_follows_the_conventions_and_labels_are_bounded() -> None:
    assert len(BY_NAME) == len(SCHEMA)
    for m in SCHEMA:
        assert m.name.startswith(("nodewise_", "vllm:")), m.name
        assert (m.kind == "counter") == m.name.endswith("_total"), m.name
        assert m.kind != "histogram" or m.name.endswith("_seconds"), m.name
        # nothing a client chooses: no request ids, prompts, users
        assert not {"request_id", "prompt", "user", "id"} & set(m.labels), m.name
    assert {m.name for m in SCHEMA if m.scope == "gateway"} == set(GATEWAY)
    assert route_label("/invocations") == "/invocations"
    assert route_label("/v1/completions") == "/v1/completions"
    assert route_label("/../etc/passwd?x=1") == "other"  # a client's path never becomes a label


def test_a_serving_process_exposes_the_schema_and_nothing_else() -> None:
    m = llm_metrics()
    m.observe("/v1/completions", 200, 0.12)
    m.observe("/v1/completions", 200, 0.3)
    m.observe("/v1/completions", 400, 0.001)
    m.observe("/nope", 404, 0.001)
    m.observe("/metrics", 200, 0.001)  # a scrape is not traffic
    m.on_prompt(7)
    m.on_token(arrived=10.0, previous=None, now=10.25)  # first token: 0.25 s
    m.on_token(arrived=10.0, previous=10.25, now=10.29)  # then 40 ms
    text = m.exposition().decode()
    assert value(text, "nodewise_requests_total", route="/v1/completions", status="200") == 2
    assert value(text, "nodewise_requests_total", route="/v1/completions", status="400") == 1
    assert value(text, "nodewise_requests_total", route="other", status="404") == 1
    assert not [k for k in samples(text) if k[0] == "nodewise_requests_total" and ("route", "/metrics") in k[1]]
    assert value(text, "nodewise_request_duration_seconds_count", route="/v1/completions") == 3
    assert value(text, "nodewise_time_to_first_token_seconds_sum") == pytest.approx(0.25)
    assert value(text, "nodewise_inter_token_latency_seconds_sum") == pytest.approx(0.04)
    assert value(text, "nodewise_generation_tokens_total") == 2
    assert value(text, "nodewise_prompt_tokens_total") == 7
    assert value(text, "nodewise_latency_target_seconds", model="tiny-llama", version="3") == 0.5
    assert value(text, "nodewise_model_info", backend="deepspeed_mpi") == 1
    # the engine's load, read at scrape time, under nodewise's names and the gateway's
    assert value(text, "nodewise_sequences_running") == 3
    assert value(text, "nodewise_sequences_blocked") == 1  # of the 2 waiting: what the policy scales on
    assert value(text, "nodewise_requests_queued") == 2  # what waits is the engine's queue
    assert value(text, "vllm:num_requests_waiting", model_name="tiny-llama") == 2
    assert value(text, "vllm:num_requests_running", model_name="tiny-llama") == 3
    assert value(text, "vllm:kv_cache_usage_perc", model_name="tiny-llama") == pytest.approx(96 / 512)
    names = {f.name for f in text_string_to_metric_families(text)}
    assert names <= {BY_NAME[n].name.removesuffix("_total") if BY_NAME[n].kind == "counter" else n for n in BY_NAME}
    assert "_created" not in text
    assert promtool_problems(text) == []


def test_a_stream_is_in_flight_until_its_end() -> None:
    m = ServingMetrics("m", "1", "ray_serve")
    m.in_flight.inc()
    chunks = m.streamed("/generate", time.perf_counter(), iter([b"a", b"b"]))
    assert next(chunks) == b"a"
    assert value(m.exposition().decode(), "nodewise_requests_in_flight") == 1
    assert list(chunks) == [b"b"]
    text = m.exposition().decode()
    assert value(text, "nodewise_requests_in_flight") == 0
    assert value(text, "nodewise_requests_total", route="/generate", status="200") == 1


def test_a_replicas_own_port_serves_its_metrics() -> None:
    m = ServingMetrics("m", "1", "ray_serve")
    m.observe("/invocations", 200, 0.01)
    address, stop = serve_metrics(m, "127.0.0.1")
    try:
        text = httpx.get(f"http://{address}/metrics", timeout=5).text
    finally:
        stop()
    assert value(text, "nodewise_requests_total", route="/invocations") == 1


@pytest.mark.parametrize(
    ("cause", "kind"),
    [
        ("canary inference took over 30 s (hung or overloaded)", "hung"),
        ("canary inference failed: RuntimeError: boom", "failing"),
        ("12 of 40 requests failed in the last 60 s", "failing"),
        ("memory 2100 MiB is past its limit 1024 MiB", "memory"),
        ("mpirun exited (status 137): a rank died, so mpirun stopped them all", "exited"),
        ("the replica exited; Serve started another", "exited"),
        ("rank 1: no heartbeat for 12 s", "unhealthy"),
        ("1 of 2 replicas running; 1 waiting (PENDING_ALLOCATION)", "unplaceable"),
        ("1 of 2 replicas running; dead nodes: 3f2a", "node_lost"),
        ("was: 1 of 2 replicas running", "unplaceable"),
        ("something new", "other"),
    ],
)
def test_a_watchdog_cause_becomes_one_of_a_few_labels(cause: str, kind: str) -> None:
    assert counts.cause_class(cause) == kind
    assert kind in counts.CAUSES


def test_action_kinds() -> None:
    assert counts.action_kind("nodewise.replica.restarted") == "replica_restarted"
    assert counts.action_kind("nodewise.cluster.restarted") == "cluster_restarted"
    assert counts.action_kind("nodewise.front.held") == "front_held"
    assert counts.action_kind("nodewise.replica.replaced") == "replica_replaced"
    assert counts.action_kind("nodewise.deployment.degraded") == "degraded"


def _record(app: str, backend: str, endpoint: str, **spec: object) -> DeploymentRecord:
    return DeploymentRecord(
        app_name=app,
        model_name=app,
        model_version="2",
        model_uri=f"models:/{app}/2",
        backend=backend,
        endpoint=endpoint,
        replicas=1,
        plan="test",
        spec={"metrics": True, **spec},
    )


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(state_dir=tmp_path / "state", watchdog={"max_restarts": 3, "window_s": 600})


def test_the_exporter_reads_the_state_folder_at_each_scrape(settings: Settings) -> None:
    from prometheus_client import generate_latest

    state = settings.state
    state.root.mkdir(parents=True)
    closed = "http://127.0.0.1:9"  # nothing listens on the discard port: down
    records = {
        "failing": _record("failing", "ray_serve", closed),
        "idle": _record("idle", "ray_serve", closed, min_replicas=0),
        "gone": _record("gone", "ray_serve", closed),
    }
    write_json(state.records, {k: v.model_dump(mode="json") for k, v in records.items()})
    now = time.time()
    watch = {
        "failing": {"restarts": [now - 10, now - 5], "failed": None, "degraded": "1 of 2 replicas running"},
        "idle": {"restarts": [], "running": 0},
        "gone": {"restarts": [now - 10_000]},  # outside the window: the whole budget is back
    }
    write_json(state.watchdog, {"apps": watch, "actions": []})
    path = state.prometheus / "counts.json"
    for cause in ("canary inference took over 30 s", "canary inference took over 30 s", "memory 2 GiB past"):
        counts.bump(
            path,
            "watchdog_actions",
            {"app": "failing", "kind": "replica_restarted", "cause": counts.cause_class(cause)},
        )
    counts.set_last(path, "restart_duration_seconds", {"app": "failing", "kind": "replica_restarted"}, 6.5)
    counts.bump(path, "rollouts", {"model": "failing", "outcome": "rolled_back"})
    rollout = {"challenger_version": "3", "mode": "canary", "shares": [0.05, 0.25], "step": 1}
    rollout["last"] = {
        "summary": {"challenger_calls": 200, "challenger_errors": 4, "rows_compared": 50, "rows_agreeing": 49}
    }
    write_json(state.rollouts, {"failing": rollout})
    history = [{"model": "failing", "version": "2", "outcome": "serving", "duration_s": 4.2}]
    write_json(state.promotions, {"history": [*history, {"model": "failing", "version": "9", "outcome": "failed: x"}]})

    text = generate_latest(registry_for(settings)).decode()
    assert value(text, "nodewise_deployment_state", app="failing", state="degraded") == 1
    assert value(text, "nodewise_deployment_state", app="failing", state="serving") == 0
    assert value(text, "nodewise_deployment_state", app="idle", state="scaled_to_zero") == 1  # not pinged
    assert value(text, "nodewise_deployment_state", app="gone", state="down") == 1
    assert value(text, "nodewise_deployments", state="down") == 1
    assert value(text, "nodewise_watchdog_actions_total", app="failing", cause="hung") == 2
    assert value(text, "nodewise_watchdog_actions_total", app="failing", cause="memory") == 1
    assert value(text, "nodewise_restart_budget_remaining", app="failing") == 1
    assert value(text, "nodewise_restart_budget_remaining", app="gone") == 3
    assert value(text, "nodewise_restart_budget", app="gone") == 3
    assert value(text, "nodewise_restart_duration_seconds", app="failing") == 6.5
    assert value(text, "nodewise_rollouts_total", model="failing", outcome="rolled_back") == 1
    assert value(text, "nodewise_rollout_share", model="failing", version="3", mode="canary") == 0.25
    assert value(text, "nodewise_rollout_error_ratio", model="failing") == pytest.approx(0.02)
    assert value(text, "nodewise_rollout_agreement_ratio", model="failing") == pytest.approx(0.98)
    assert value(text, "nodewise_promotion_duration_seconds", model="failing") == 4.2
    assert promtool_problems(text) == []
    # the counters survive the watchdog's own list being cut to its last entries: they only go up
    counts.bump(path, "rollouts", {"model": "failing", "outcome": "rolled_back"})
    assert value(generate_latest(registry_for(settings)).decode(), "nodewise_rollouts_total") == 2


def test_targets_follow_replicas_and_deployments(settings: Settings) -> None:
    serve = _record("digits", "ray_serve", "http://127.0.0.1:8000/digits")
    targets.write_targets(settings, serve, {"r1": "10.0.0.1:4001", "r2": "10.0.0.2:4002"})
    # a later pass: r2 did not answer (kept, so Prometheus shows it down), r1 was replaced by r3
    targets.write_targets(settings, serve, {"r2": None, "r3": "10.0.0.1:4003"})
    [(name, groups)] = targets.read_targets(settings).items()
    assert name == "serving/digits.json"
    assert {g["labels"]["replica"]: g["targets"] for g in groups} == {"r2": ["10.0.0.2:4002"], "r3": ["10.0.0.1:4003"]}
    assert groups[0]["labels"] | {"replica": "-"} == {"app": "digits", "backend": "ray_serve", "replica": "-"}
    lm = _record("lm", "deepspeed_mpi", "http://127.0.0.1:8100")
    targets.write_deepspeed_target(settings, lm, "http://10.0.0.5:8100")
    targets.write_control_target(settings, "127.0.0.1:9464")
    assert json.loads(targets.control_file(settings).read_text())[0]["targets"] == ["127.0.0.1:9464"]
    # only what is recorded keeps a file
    write_json(settings.state.records, {"lm": lm.model_dump(mode="json")})
    targets.refresh(settings)
    assert sorted(targets.read_targets(settings)) == ["control/control.json", "serving/lm.json"]


def test_quantile_interpolates_as_prometheus_does() -> None:
    from tasks.metrics.live import quantile

    buckets = {0.1: 50.0, 0.2: 90.0, 0.5: 100.0, float("inf"): 100.0}
    assert quantile(0.5, buckets) == pytest.approx(0.1)
    assert quantile(0.7, buckets) == pytest.approx(0.15)
    assert quantile(0.99, buckets) == pytest.approx(0.47)
    assert quantile(0.99, {0.1: 0.0, float("inf"): 0.0}) is None


def test_status_figures_come_from_the_targets_over_a_window(settings: Settings) -> None:
    import threading

    from tasks.metrics.live import live_figures

    busy, idle = ServingMetrics("busy", "1", "ray_serve"), ServingMetrics("idle", "1", "deepspeed_mpi")
    idle.observe("/generate", 200, 0.3)  # before the window: its p99 is the one since start
    for _ in range(3):
        busy.in_flight.inc()  # the load the autoscaling policy reads, summed over targets for status
    servers = [serve_metrics(m, "127.0.0.1") for m in (busy, idle)]
    targets.write_targets(settings, _record("busy", "ray_serve", "http://x"), {"r1": servers[0][0]})
    targets.write_deepspeed_target(settings, _record("idle", "deepspeed_mpi", "http://x"), f"http://{servers[1][0]}")
    counts.bump(
        settings.state.prometheus / "counts.json",
        "watchdog_actions",
        {"app": "busy", "kind": "replica_replaced", "cause": "exited"},
    )
    stop = threading.Event()

    def traffic() -> None:
        while not stop.wait(0.01):
            busy.observe("/invocations", 200, 0.02)
            busy.observe("/ping", 200, 5.0)  # a health check is not traffic

    sender = threading.Thread(target=traffic)
    sender.start()
    try:
        figures = live_figures(settings, window_s=0.5)
    finally:
        stop.set()
        sender.join()
        for _, stop_server in servers:
            stop_server()
    assert figures["busy"]["requests_per_s"] > 5
    assert figures["busy"]["p99_s"] == pytest.approx(0.025, abs=0.001)  # inside the 10-25 ms bucket
    assert figures["busy"]["p99_over"].startswith("the last")
    assert figures["busy"]["restarts"] == 1
    assert figures["busy"]["load"] == {"in_flight": 3.0}
    assert figures["idle"] == {
        "requests_per_s": 0.0,
        "p99_s": pytest.approx(0.5 - 0.25 * 0.01, abs=0.01),
        "p99_over": "since start",
        "restarts": 0,
        "targets": 1,
        "answering": 1,
        "load": {"in_flight": 0.0},
    }
