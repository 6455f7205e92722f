"""nodewise's metrics: one schema for every serving process, exported with ``prometheus_client``.

The names are a contract (dashboards and alert rules in ``deployments/`` read them; a gateway reads
the ``vllm:`` gauges): they are defined once, here, in ``SCHEMA``, and every process builds its
metrics from it. A Ray Serve replica and DeepSpeed's rank 0 export the same names with the same
labels, so one query covers both backends. Labels are bounded: the model's name and version, a
route from a fixed list (anything else is ``other``), the HTTP status; never a request id, a prompt
or a user's value. The control plane's metrics (``scope="control"``) are computed from the state
folder by the exporter that ``nodewise up`` starts (``tasks/metrics/exporter.py``).

Per process, ``ServingMetrics`` keeps its own registry (no global state: a test can build two),
counts each request when it is answered, and reads the engine's gauges only when scraped, so a
decoding step pays nothing for them.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

disable_created_metrics()  # no ``_created`` series: half the series, and nothing a dashboard reads

Kind = Literal["counter", "gauge", "histogram"]
Scope = Literal["serving", "llm", "gateway", "control", "front"]


@dataclass(frozen=True)
class MetricDef:
    """One metric of the schema, as a scrape shows it (a counter's name ends in ``_total``)."""

    name: str
    kind: Kind
    labels: tuple[str, ...]
    help: str
    scope: Scope


_MV = ("model", "version")
SCHEMA: tuple[MetricDef, ...] = (
    # every serving endpoint (a Ray Serve replica, DeepSpeed's rank 0)
    MetricDef(
        "nodewise_requests_total", "counter", (*_MV, "route", "status"), "Requests answered, by HTTP status.", "serving"
    ),
    MetricDef(
        "nodewise_request_duration_seconds",
        "histogram",
        (*_MV, "route"),
        "Time from a request's arrival to its last byte (a stream's end).",
        "serving",
    ),
    MetricDef("nodewise_requests_in_flight", "gauge", _MV, "Requests received and not yet answered.", "serving"),
    MetricDef(
        "nodewise_requests_queued",
        "gauge",
        _MV,
        "Requests waiting for compute (a batch to form, or a place in the engine's token budget).",
        "serving",
    ),
    MetricDef(
        "nodewise_model_info", "gauge", (*_MV, "backend"), "1 for the model version this process serves.", "serving"
    ),
    MetricDef(
        "nodewise_latency_target_seconds",
        "gauge",
        _MV,
        "The p99 latency to keep under (NODEWISE_METRICS__LATENCY_TARGET_S); alerts compare with it.",
        "serving",
    ),
    # language models (the batching engine)
    MetricDef(
        "nodewise_time_to_first_token_seconds", "histogram", _MV, "From a request's arrival to its first token.", "llm"
    ),
    MetricDef("nodewise_inter_token_latency_seconds", "histogram", _MV, "Between two tokens of one sequence.", "llm"),
    MetricDef("nodewise_prompt_tokens_total", "counter", _MV, "Prompt tokens of the sequences admitted.", "llm"),
    MetricDef("nodewise_generation_tokens_total", "counter", _MV, "Tokens generated.", "llm"),
    MetricDef("nodewise_sequences_running", "gauge", _MV, "Sequences in the engine's batch.", "llm"),
    MetricDef("nodewise_sequences_waiting", "gauge", _MV, "Sequences waiting for room in the token budget.", "llm"),
    MetricDef(
        "nodewise_sequences_blocked",
        "gauge",
        _MV,
        "Waiting sequences the batch has no room for now (what waits for the next step alone is not"
        " counted): the LLM autoscaling policy's signal.",
        "llm",
    ),
    MetricDef(
        "nodewise_tokens_in_flight",
        "gauge",
        _MV,
        "Tokens of the budget held by running sequences (their KV cache).",
        "llm",
    ),
    MetricDef(
        "nodewise_token_budget", "gauge", _MV, "Tokens the engine holds at once (the KV cache the plan counted).", "llm"
    ),
    # the Gateway API Inference Extension's model-server protocol (its endpoint picker reads these)
    MetricDef(
        "vllm:num_requests_waiting", "gauge", ("model_name",), "Sequences waiting (as vLLM names it).", "gateway"
    ),
    MetricDef(
        "vllm:num_requests_running", "gauge", ("model_name",), "Sequences running (as vLLM names it).", "gateway"
    ),
    MetricDef(
        "vllm:kv_cache_usage_perc",
        "gauge",
        ("model_name",),
        "Share of the token budget in use, 0..1 (as vLLM names it).",
        "gateway",
    ),
    # the control plane (tasks/metrics/exporter.py, from the state folder)
    MetricDef(
        "nodewise_deployment_state",
        "gauge",
        ("app", "model", "backend", "state"),
        "1 for each deployment's state: serving, degraded, scaled_to_zero, failed or down.",
        "control",
    ),
    MetricDef("nodewise_deployments", "gauge", ("state",), "Deployments in each state.", "control"),
    MetricDef(
        "nodewise_watchdog_actions_total",
        "counter",
        ("app", "kind", "cause"),
        "What the watchdog did (kind) and why (cause, one of a fixed few).",
        "control",
    ),
    MetricDef(
        "nodewise_restart_budget_remaining", "gauge", ("app",), "Restarts the watchdog may still make now.", "control"
    ),
    MetricDef("nodewise_restart_budget", "gauge", ("app",), "Restarts allowed per window (max_restarts).", "control"),
    MetricDef(
        "nodewise_restart_duration_seconds",
        "gauge",
        ("app", "kind"),
        "How long the last restart took (a replica, or a whole group).",
        "control",
    ),
    MetricDef(
        "nodewise_rollout_share", "gauge", ("model", "version", "mode"), "A rollout's share of requests.", "control"
    ),
    MetricDef("nodewise_rollout_calls", "gauge", _MV, "Challenger calls counted at the last decision.", "control"),
    MetricDef(
        "nodewise_rollout_error_ratio", "gauge", _MV, "The challenger's error rate at the last decision.", "control"
    ),
    MetricDef(
        "nodewise_rollout_agreement_ratio", "gauge", _MV, "The challenger's agreement at the last decision.", "control"
    ),
    MetricDef("nodewise_rollouts_total", "counter", ("model", "outcome"), "Rollouts ended, by outcome.", "control"),
    MetricDef(
        "nodewise_promotion_duration_seconds",
        "gauge",
        ("model",),
        "How long the last promotion's deploy took.",
        "control",
    ),
)
SCHEMA += (
    # a DeepSpeed deployment's front (serving/front.py), which outlives its group
    MetricDef("nodewise_front_holds_total", "counter", ("app",), "Requests held while the group was down.", "front"),
    MetricDef(
        "nodewise_front_retries_total", "counter", ("app",), "Requests sent again after the group died.", "front"
    ),
    MetricDef(
        "nodewise_front_streams_continued_total",
        "counter",
        ("app",),
        "Streams cut by a restart and continued on the new group.",
        "front",
    ),
    MetricDef(
        "nodewise_front_hold_timeouts_total",
        "counter",
        ("app", "reason"),
        "Requests answered 503 by the front: held past hold_timeout_s (timeout) or the queue full (full).",
        "front",
    ),
    MetricDef("nodewise_front_held", "gauge", ("app",), "Requests held now, waiting for the group.", "front"),
)
BY_NAME = {m.name: m for m in SCHEMA}

ROUTES = (
    "/invocations",
    "/generate",
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/ping",
    "/health",
    "/version",
    "/openapi.json",
)
UNCOUNTED = frozenset({"/metrics", "/internal/heartbeat"})  # scrapes and rank heartbeats are not traffic
# Seconds: 1 ms .. 60 s, denser where a small model answers.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


def route_label(path: str) -> str:
    """``path``'s route label: one of ``ROUTES``, else ``other`` (a label never takes a client's value)."""
    return path if path in ROUTES else "other"


@dataclass(frozen=True)
class EngineLoad:
    """What the engine holds, read at scrape time."""

    running: int
    waiting: int
    tokens_in_flight: int
    token_budget: int
    blocked: int = 0  # of the waiting, those the batch has no room for now (Engine.blocked)


def _help(name: str) -> str:
    return BY_NAME[name].help


def _labels(name: str) -> list[str]:
    return list(BY_NAME[name].labels)


def _base(name: str) -> str:
    """prometheus_client adds ``_total`` to a counter's name itself."""
    return name.removesuffix("_total") if BY_NAME[name].kind == "counter" else name


class ServingMetrics:
    """One serving process's metrics (a replica or rank 0), in a registry of its own."""

    def __init__(self, model: str, version: str, backend: str, latency_target_s: float = 1.0) -> None:
        self.model, self.version = model, version
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry

        def make(cls: Any, name: str, **kw: Any) -> Any:
            return cls(_base(name), _help(name), _labels(name), registry=r, **kw)

        self._requests = make(Counter, "nodewise_requests_total")
        self._duration = make(Histogram, "nodewise_request_duration_seconds", buckets=LATENCY_BUCKETS)
        self.in_flight = make(Gauge, "nodewise_requests_in_flight").labels(model, version)
        self.queued = make(Gauge, "nodewise_requests_queued").labels(model, version)
        make(Gauge, "nodewise_model_info").labels(model, version, backend).set(1)
        make(Gauge, "nodewise_latency_target_seconds").labels(model, version).set(latency_target_s)
        self._counted: dict[tuple[str, str], Any] = {}  # the children by (route, status): no lookup per request
        self._timed: dict[str, Any] = {}
        self._ttft: Any = None
        self._itl: Any = None
        self._generated: Any = None
        self._prompted: Any = None

    # -- requests ------------------------------------------------------------------------------
    def observe(self, route: str, status: int, seconds: float) -> None:
        """One request answered: ``route`` a path (labelled by ``route_label``), its status and duration."""
        if route in UNCOUNTED:
            return
        route = route_label(route)
        key = (route, str(status))
        counter = self._counted.get(key)
        if counter is None:
            counter = self._counted[key] = self._requests.labels(self.model, self.version, route, key[1])
        counter.inc()
        timer = self._timed.get(route)
        if timer is None:
            timer = self._timed[route] = self._duration.labels(self.model, self.version, route)
        timer.observe(seconds)

    def streamed(self, route: str, started: float, chunks: Iterable[Any]) -> Iterator[Any]:
        """``chunks`` passed through; the request is counted (200) when the stream ends, in flight until then."""
        try:
            yield from chunks
        finally:
            self.in_flight.dec()
            self.observe(route, 200, time.perf_counter() - started)

    async def astreamed(self, route: str, started: float, chunks: AsyncIterable[Any]) -> AsyncIterator[Any]:
        """``streamed`` for an asynchronous stream (a Starlette ``StreamingResponse``'s body)."""
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            self.in_flight.dec()
            self.observe(route, 200, time.perf_counter() - started)

    # -- language models -----------------------------------------------------------------------
    def add_engine(self, load: Callable[[], EngineLoad]) -> None:
        """An engine's metrics: token timings as they come (``on_token``), its load when scraped."""
        r, labels = self.registry, (self.model, self.version)

        def child(cls: Any, name: str, **kw: Any) -> Any:
            return cls(_base(name), _help(name), _labels(name), registry=r, **kw).labels(*labels)

        self._ttft = child(Histogram, "nodewise_time_to_first_token_seconds", buckets=TOKEN_BUCKETS)
        self._itl = child(Histogram, "nodewise_inter_token_latency_seconds", buckets=TOKEN_BUCKETS)
        self._generated = child(Counter, "nodewise_generation_tokens_total")
        self._prompted = child(Counter, "nodewise_prompt_tokens_total")
        r.register(_EngineCollector(self.model, self.version, load))
        self.queued.set_function(lambda: load().waiting)  # what waits is the engine's queue

    def on_prompt(self, tokens: int) -> None:
        if self._prompted is not None:
            self._prompted.inc(tokens)

    def on_token(self, arrived: float, previous: float | None, now: float) -> None:
        """A sequence's token at ``now`` (monotonic seconds): its first (``previous`` None) or a later one."""
        if self._generated is None:
            return
        self._generated.inc()
        if previous is None:
            self._ttft.observe(now - arrived)
        else:
            self._itl.observe(now - previous)

    # -- the scrape ------------------------------------------------------------------------------
    def exposition(self) -> bytes:
        """The text a scrape of ``/metrics`` gets (Prometheus' text format 0.0.4)."""
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    """The engine's gauges, read when scraped, under nodewise's names and the gateway's."""

    def __init__(self, model: str, version: str, load: Callable[[], EngineLoad]) -> None:
        self.labels, self.model, self.load = [model, version], model, load

    def collect(self) -> Iterator[Metric]:
        now = self.load()
        used = min(1.0, now.tokens_in_flight / now.token_budget) if now.token_budget else 0.0
        for name, value in (
            ("nodewise_sequences_running", now.running),
            ("nodewise_sequences_waiting", now.waiting),
            ("nodewise_sequences_blocked", now.blocked),
            ("nodewise_tokens_in_flight", now.tokens_in_flight),
            ("nodewise_token_budget", now.token_budget),
        ):
            family = GaugeMetricFamily(name, _help(name), labels=_labels(name))
            family.add_metric(self.labels, value)
            yield family
        for name, value in (
            ("vllm:num_requests_waiting", now.waiting),
            ("vllm:num_requests_running", now.running),
            ("vllm:kv_cache_usage_perc", used),
        ):
            family = GaugeMetricFamily(name, _help(name), labels=["model_name"])
            family.add_metric([self.model], value)
            yield family

    def describe(self) -> Iterator[Metric]:
        return iter(())


def serve_metrics(metrics: ServingMetrics, host: str, port: int = 0) -> tuple[str, Callable[[], None]]:
    """``metrics`` on an HTTP server of their own (prometheus_client's WSGI app and threading server):
    its ``host:port`` and a stop. Always the text format 0.0.4: asked for OpenMetrics 1.0 (Prometheus
    2.x asks so), prometheus_client would spell the gateway's ``vllm:`` names ``vllm_``, and the
    Inference Extension's endpoint picker reads them with their colons."""
    import threading
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    app = make_wsgi_app(metrics.registry)

    def text_format(environ: dict[str, Any], start_response: Any) -> Any:
        environ["HTTP_ACCEPT"] = "text/plain"
        return app(environ, start_response)

    server = make_server(host, port, text_format, ThreadingWSGIServer, handler_class=Quiet)
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return f"{_url_host(host)}:{server.server_port}", stop


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
