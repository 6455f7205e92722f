"""The ``nodewise`` command line.

User mistakes (``NodewiseError``, invalid settings) end in one ``error: ...`` line and a
non-zero exit, with no traceback. Heavy libraries are imported only inside commands, after
``configure_process`` has pointed them at the state folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Annotated, Any

import click
import typer
import typer.core
from pydantic import ValidationError

from nodewise.core.errors import InvalidInput, InvalidSetting, NodewiseError
from nodewise.core.runtime import configure_process
from nodewise.core.settings import Settings, load_settings, using_settings


class _Commands(typer.core.TyperGroup):
    """Every command's ``NodewiseError`` ends here, once: one ``error:`` line and the error's exit
    code, no traceback (anything else is a bug and keeps its traceback)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except NodewiseError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(e.exit_code) from None
        except RuntimeError as e:
            if not str(e).startswith(_EPHEMERAL_TIMEOUT):
                raise
            waited = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "?")
            exited = " (it exited)" if "exited with code" in str(e) else ""
            typer.echo(
                f"error: Prefect's temporary server did not answer within {waited} s{exited}; start a server "
                "(`prefect server start`, or `nodewise up`) and set NODEWISE_PREFECT__API_URL to its API, or "
                "raise NODEWISE_PREFECT__EPHEMERAL_STARTUP_TIMEOUT_S",
                err=True,
            )
            raise typer.Exit(3) from None


# What Prefect raises (a bare RuntimeError) when its ephemeral API does not come up in time.
_EPHEMERAL_TIMEOUT = "Timed out while attempting to connect to ephemeral Prefect API server"


app = typer.Typer(
    cls=_Commands,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Put registered MLflow models into production on Ray Serve or DeepSpeed.",
)


def _settings(runs_flows: bool = False) -> Settings:
    """The settings, with the library environment applied to this process before any command
    imports Prefect, Ray or MLflow; ``runs_flows``: also Prefect's logging, quiet on user errors."""
    try:
        settings = load_settings()
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        env = "NODEWISE_" + "__".join(str(p).upper() for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        if isinstance(first.get("input"), dict):  # a rule across the fields of one section
            raise InvalidSetting(f"invalid settings in {where}: {message} ({env}__*)") from e
        raise InvalidSetting(f"invalid setting {where} ({first.get('input')!r}): {message}; fix {env}") from e
    configure_process(settings)
    if runs_flows:
        _quiet_user_errors()
    return settings


class _DropUserTracebacks(logging.Filter):
    """Prefect logs a traceback for every failed run; a user's mistake needs one line, not that."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], NodewiseError):
            record.exc_info = None
            record.exc_text = None
        return True


def _quiet_user_errors() -> None:
    from prefect.logging.configuration import setup_logging

    setup_logging()  # Prefect's console handlers, before Ray or MLflow add any of their own
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    drop = _DropUserTracebacks()
    names = ["", *[n for n in logging.root.manager.loggerDict if n.startswith("prefect")]]
    for name in names:
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(drop)


@app.command()
def demo(
    detach: Annotated[
        bool, typer.Option("--detach", help="Return once serving; stop later with `nodewise down`.")
    ] = False,
    retrain: Annotated[
        bool, typer.Option("--retrain", help="Train and register a new version even if one exists.")
    ] = False,
    lm: Annotated[
        bool,
        typer.Option(
            "--lm/--no-lm", help="Also serve a small causal LM on two DeepSpeed ranks under mpirun (multi-node path)."
        ),
    ] = True,
) -> None:
    """Serve a small digits model on Ray Serve and a small causal LM on DeepSpeed ranks under mpirun.

    The digits model is trained, registered as @champion, deployed and asked for a prediction.
    The LM (a Llama-style model with random weights) is registered too, and placed on a declared
    inventory of two nodes on this machine, each too small to hold it: the plan splits it over
    both, and mpirun starts one DeepSpeed rank per node.
    """
    settings = _settings(runs_flows=True)
    started = time.monotonic()
    from nodewise.cli.demo_show import demo_multi_node, show_prediction
    from nodewise.cli.deploy import deploy_and_report
    from nodewise.demo_models import register_demo_model

    typer.echo(f"state folder: {settings.state_path}")
    model = register_demo_model(str(settings.state.artifacts), retrain=retrain)
    verb = "trained and registered" if model.trained else "reusing"
    typer.echo(f"{verb} models:/{model.name}/{model.version} (test accuracy {model.accuracy:.1%}), alias @champion")
    record = deploy_and_report(f"models:/{model.name}@champion", None, settings)
    show_prediction(record.endpoint)
    if lm:
        demo_multi_node(settings, retrain)
    typer.echo(f"ready in {time.monotonic() - started:.1f} s")
    if detach:
        typer.echo("detached: `nodewise status` shows it, `nodewise down` stops it")
        return
    typer.echo("serving; press Ctrl-C to stop")
    _stop_on_signals()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        typer.echo("\nstopping")
        for line in _down(settings):
            typer.echo(line)


def _stop_on_signals() -> None:
    """Ctrl-C and SIGTERM both stop what the demo started (even if SIGINT was inherited ignored)."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)


@app.command()
def deploy(
    model_uri: Annotated[str, typer.Argument(help="models:/NAME@ALIAS or models:/NAME/VERSION")],
    replicas: Annotated[int | None, typer.Option(min=1, help="Replicas wanted (the plan may give fewer).")] = None,
    inventory: Annotated[
        str, typer.Option(help="Where it may run: local, nvml, ray[:ADDRESS], k8s, or a YAML file of nodes")
    ] = "local",
) -> None:
    """Deploy a registered model where it fits, smoke-test it and record it.

    One node holds it: Ray Serve replicas. Several nodes needed: DeepSpeed ranks under mpirun.
    """
    settings = _settings(runs_flows=True)  # the library environment first: before Prefect, MLflow or Ray load
    from nodewise.cli.deploy import deploy_and_report
    from tasks.planning.registry import parse_model_uri

    parse_model_uri(model_uri)  # a typo fails before anything starts
    deploy_and_report(model_uri, replicas, settings, inventory)


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """What is deployed, where, which version, and whether it answers."""
    settings = _settings()
    from nodewise.ops.status import deployment_status

    if as_json:
        # Ray's driver may print while connecting, and its threads later still: stdout (fd 1)
        # points at stderr for the rest of this process; the JSON goes to the real stdout alone.
        sys.stdout.flush()
        real = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)
        rows = deployment_status(settings)
        real.write(json.dumps(rows, indent=2) + "\n")
        real.flush()
        return
    with _stdout_to_stderr():  # Ray's driver may print while connecting
        rows = deployment_status(settings)
    if not rows["deployments"]:
        typer.echo(f"nothing deployed ({rows['cluster']})")
        return
    typer.echo(f"ray: {rows['cluster']}" + _nodes(rows.get("nodes")))
    for action in rows.get("watchdog", []):
        typer.echo(f"watchdog {action['at']}: {action['event']} {action['app']}: {action['cause']} {action['outcome']}")
    for row in rows["deployments"]:
        typer.echo(
            f"{row['app']}: {row['model_uri']} (version {row['version']}) on {row['backend']}, "
            + (f"{row['ranks']} rank(s), " if row.get("ranks") else _replicas(row))
            + f"{row['health']} at {row['endpoint']}, "
            f"deployed {row['deployed_at']}" + _where(row)
        )
        if row.get("replaced"):
            typer.echo(f"  took over: {row['replaced']}")  # the upgrade: beside the old group, or held
        if row.get("rollout"):
            r = row["rollout"]
            typer.echo(f"  rollout ({r['phase']}): {r['summary']}; last decision: {r['last_decision'] or 'none yet'}")
        if row.get("last_rollout"):
            typer.echo(f"  last rollout: {row['last_rollout']}")
        if row.get("traffic"):
            typer.echo(f"  {_traffic(row['traffic'])}")
        if (row.get("autoscaling") or {}).get("why"):
            typer.echo(f"  autoscaling: {row['autoscaling']['why']}")


def _traffic(t: dict[str, Any]) -> str:
    """One line of a deployment's live figures (tasks/metrics/live.py)."""
    p99 = "no request yet" if t["p99_s"] is None else f"p99 {t['p99_s'] * 1000:.0f} ms ({t['p99_over']})"
    where = f"{t['answering']} of {t['targets']} metrics endpoints answered"
    return f"traffic: {t['requests_per_s']:.1f} req/s, {p99}; watchdog restarts: {t['restarts']}; {where}"


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """File descriptor 1 points at stderr meanwhile (libraries' C++ logs too), then back."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _nodes(nodes: dict[str, Any] | None) -> str:
    """The Ray nodes, for `nodewise status`: how many run, how many the autoscaler added and removed."""
    if not nodes:
        return ""
    workers = sum(not n["head"] for n in nodes["alive"])
    text = f"; {len(nodes['alive'])} node(s) alive"
    if nodes.get("max_added_nodes"):
        text += f" ({workers} added by Ray's autoscaler, at most {nodes['max_added_nodes']})"
    if nodes["removed"]:
        text += f", {len(nodes['removed'])} removed"
    return text


def _replicas(row: dict[str, Any]) -> str:
    """How many replicas serve, for `nodewise status`: the running ones and the bounds when autoscaling."""
    bounds = row.get("autoscaling")
    if not bounds:
        return f"{row['replicas']} replica(s), "
    running = sum(r["state"] == "RUNNING" for r in row.get("replica_nodes", []))
    ceiling = f"; ceiling: {bounds['ceiling']}" if bounds.get("ceiling") else ""
    return f"{running} replica(s) running (autoscaling {bounds['min_replicas']}-{bounds['max_replicas']}{ceiling}), "


def _where(row: dict[str, Any]) -> str:
    """Where a deployment's ranks or replicas run, for `nodewise status`."""
    if row.get("rank_hosts"):
        spares = f"; spare {', '.join(row['spare_hosts'])}" if row.get("spare_hosts") else ""
        front = f"; front: {row['front']}" if row.get("front") else ""  # "holding 12 requests: ..., 9 s"
        return f"; ranks on {', '.join(row['rank_hosts'])}{spares}{front}"
    if row.get("replica_nodes"):
        return "; replicas on " + ", ".join(f"{r['node']} ({r['state'].lower()})" for r in row["replica_nodes"])
    return ""


@app.command()
def profile(
    model: Annotated[
        str, typer.Argument(help="models:/NAME@ALIAS, models:/NAME/VERSION, or a transformers config.json")
    ],
    inventory: Annotated[str, typer.Option(help="local, nvml, ray[:ADDRESS], k8s, or a YAML file")] = "local",
    dtype: Annotated[str | None, typer.Option(help="Weights dtype override: fp32, bf16, fp16, int8, int4")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows (or sequences) per forward pass")] = 1,
    seq_len: Annotated[int | None, typer.Option(min=1, help="Tokens per sequence (causal LMs)")] = None,
    measure: Annotated[bool, typer.Option(help="Also measure a registered model in a subprocess")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """How much memory MODEL needs, and where it would run on INVENTORY (nothing is deployed)."""
    settings = _settings()
    from nodewise.cli.profile import profile_and_plan

    result = profile_and_plan(
        model, inventory, settings, dtype=dtype, batch_size=batch_size, seq_len=seq_len, measure=measure
    )
    _QUICK_EXIT.append(True)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(f"{result['model']}: {result['param_count']:,} parameters, {result['method']} profile")
    for name, value in result["breakdown_bytes"].items():
        typer.echo(f"  {name:<12} {value / 1024**3:10.3f} GiB")
    plan = result["plan"]
    typer.echo(f"plan ({result['inventory']}): " + ("; ".join(plan["reasons"])))


@app.command()
def render(
    model_uri: Annotated[str, typer.Argument(help="models:/NAME@ALIAS or models:/NAME/VERSION")],
    out: Annotated[str, typer.Option(help="Folder for the manifests (for `kubectl apply -f DIR`)")],
    target: Annotated[str, typer.Option(help="What to render for: k8s")] = "k8s",
    inventory: Annotated[
        str, typer.Option(help="The cluster's nodes: k8s (through the API) or a YAML file of nodes")
    ] = "k8s",
    multi_node: Annotated[
        str | None, typer.Option(help="Multi-node plans as mpijob or lws (default: kubernetes.multi_node)")
    ] = None,
    apply: Annotated[
        bool, typer.Option(help="Also apply them through the Kubernetes API, wait, and let the watchdog watch them")
    ] = False,
    delete: Annotated[bool, typer.Option(help="Delete them through the Kubernetes API instead")] = False,
    allow_local: Annotated[
        bool,
        typer.Option(
            help="Render even though the tracking URI or the model's artifacts are on this machine "
            "(a kind or minikube cluster here); refused otherwise, since pods elsewhere cannot read them"
        ),
    ] = False,
    timeout: Annotated[
        float | None, typer.Option(min=1, help="Seconds --apply waits for readiness (kubernetes.ready_timeout_s)")
    ] = None,
) -> None:
    """Kubernetes manifests for MODEL, planned against the cluster's nodes: a RayService (one
    node holds it) or an MPIJob / LeaderWorkerSet (several nodes), a Service and the watchdog's RBAC."""
    from pathlib import Path

    settings = _settings()
    from tasks.planning.registry import parse_model_uri

    parse_model_uri(model_uri)
    if target != "k8s":
        raise InvalidInput(f"--target {target!r} is not known; use --target k8s")
    if multi_node not in (None, "mpijob", "lws"):
        raise InvalidInput(f"--multi-node {multi_node!r} is not known; use mpijob or lws")
    if apply and delete:
        raise InvalidInput("--apply and --delete do opposite things; give one")
    from tasks.k8s.deploy import apply_rendered, delete_rendered, manifests_for, write_manifests

    rendered = manifests_for(model_uri, inventory, settings, multi_node, allow_local)  # type: ignore[arg-type]
    for line in rendered.warnings:
        typer.echo(f"warning: {line}", err=True)
    for path in write_manifests(rendered.objects, Path(out)):
        typer.echo(f"wrote {path}")
    typer.echo(f"plan: {rendered.plan.explain()}")
    if delete:
        for line in delete_rendered(rendered, settings):
            typer.echo(line)
    elif apply:
        apply_rendered(rendered, settings, timeout, say=typer.echo)
        typer.echo("ready")


@app.command()
def watchdog(
    once: Annotated[bool, typer.Option("--once", help="One pass, then exit.")] = False,
    every: Annotated[
        float | None, typer.Option(min=1.0, help="Seconds between passes (default: watchdog.every_s, 30).")
    ] = None,
    reset: Annotated[
        str | None, typer.Option(help="Clear APP's failed mark and restart budget, then exit.", metavar="APP")
    ] = None,
) -> None:
    """Check every deployment; restart a sick replica alone or a DeepSpeed job whole, within a budget."""
    settings = _settings(runs_flows=reset is None)
    if reset is not None:
        from tasks.watchdog.engine import reset as reset_app

        typer.echo(reset_app(settings, reset))
        return
    from flows.watchdog import watch_deployments

    period = every or settings.watchdog.every_s
    _stop_on_signals()
    try:
        while True:
            with using_settings(settings):
                actions = watch_deployments()
            typer.echo(f"watchdog pass: {len(actions)} action(s)")
            if once:
                return
            time.sleep(period)
    except KeyboardInterrupt:
        typer.echo("\nwatchdog stopped")


@app.command()
def receiver(
    host: Annotated[str | None, typer.Option(help="Address to bind (default: triggers.receiver_host)")] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="Port (default: triggers.receiver_port)")] = None,
) -> None:
    """Take MLflow's signed webhooks at POST /webhook and announce promotions as Prefect events."""
    settings = _settings()
    from tasks.triggers.promotion import require_api
    from tasks.triggers.webhook_server import Receiver, registry_lookup, serve

    api = require_api(settings.prefect.api_url)
    handler = Receiver(settings, api, registry_lookup(settings))
    host, port = host or settings.triggers.receiver_host, port or settings.triggers.receiver_port
    try:
        server = serve(handler, host, port)
    except OSError as e:
        raise InvalidInput(
            f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or NODEWISE_TRIGGERS__RECEIVER_PORT"
        ) from e
    logging.getLogger("nodewise.receiver").setLevel(logging.INFO)
    typer.echo(f"receiving MLflow webhooks at http://{host}:{port}/webhook; events go to {api}")
    _stop_on_signals()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        typer.echo("\nreceiver stopped")
    finally:
        server.server_close()


@app.command()
def exporter(
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="Port (default: metrics.exporter_port)")] = None,
) -> None:
    """Answer Prometheus' scrapes with the control plane's metrics (deployments, watchdog, rollouts),
    read from the state folder; keep the scrape targets under <state>/prometheus/targets/ current."""
    settings = _settings()
    if port is not None:
        settings = settings.model_copy(update={"metrics": settings.metrics.model_copy(update={"exporter_port": port})})
    m = settings.metrics
    if m.exporter_port == 0:
        raise InvalidInput("NODEWISE_METRICS__EXPORTER_PORT is 0 (no exporter); give --port or set a port")
    from tasks.metrics.exporter import run

    typer.echo(f"control-plane metrics at http://{m.exporter_host}:{m.exporter_port}/metrics")
    _stop_on_signals()
    try:
        run(settings)
    except OSError as e:
        raise InvalidInput(
            f"cannot listen on {m.exporter_host}:{m.exporter_port} ({e.strerror}); pick another --port or "
            "NODEWISE_METRICS__EXPORTER_PORT"
        ) from e
    except KeyboardInterrupt:
        typer.echo("\nexporter stopped")


@app.command()
def poll(
    once: Annotated[bool, typer.Option("--once", help="One poll, then exit.")] = False,
    every: Annotated[float | None, typer.Option(min=1.0, help="Seconds between polls (triggers.poll_every_s)")] = None,
) -> None:
    """Watch the registry's aliases (for registries that send no webhooks); announce each change once."""
    settings = _settings()
    from tasks.planning.registry import make_client
    from tasks.triggers.promotion import Poller, require_api

    api = require_api(settings.prefect.api_url)
    client = make_client(settings.tracking_uri, settings.registry_uri)
    poller = Poller(client, settings.state.poller, alias=(settings.triggers.alias, settings.rollout.challenger_alias))
    _stop_on_signals()
    try:
        while True:
            for event in poller.poll_once(api):
                p = event["payload"]
                what = f"{p['model']}@{p['alias']} ->" if "alias" in p else f"{p['model']}: new"
                typer.echo(f"{what} version {p['version']} (event {event['id']})")
            if once:
                return
            time.sleep(every or settings.triggers.poll_every_s)
    except KeyboardInterrupt:
        typer.echo("\npoller stopped")


@app.command()
def logs(
    app_name: Annotated[str, typer.Argument(help="The deployment's name, as `nodewise status` shows it")],
    lines: Annotated[int, typer.Option(min=1, help="How many of the last lines")] = 40,
) -> None:
    """The recent output of a deployment: every DeepSpeed rank's, or where Ray Serve's replicas log."""
    settings = _settings()
    from nodewise.ops.status import deployment_logs

    typer.echo(deployment_logs(settings, app_name, lines))


def _down(settings: Settings) -> list[str]:
    from nodewise.ops.status import stop_everything

    return stop_everything(settings)


@app.command()
def down() -> None:
    """Stop everything nodewise started: its Serve apps, DeepSpeed jobs, local Ray instance and
    what `nodewise up` started; nothing else (Kubernetes is left alone: `render --delete`)."""
    settings = _settings()
    from nodewise.ops.services import down as stop_services

    for line in _down(settings):
        typer.echo(line)
    for line in stop_services(settings):
        typer.echo(line)


@app.command()
def up() -> None:
    """Start the promotion pipeline here: Prefect server + deployments + worker, MLflow server with
    webhooks, the receiver and the webhook, all on 127.0.0.1 with SQLite. Run again while it is
    up, it starts again only what has stopped."""
    settings = _settings()
    from nodewise.ops.services import up as start_services

    typer.echo("starting Prefect server, MLflow server, a worker and the webhook receiver (about a minute)")
    services = start_services(settings)
    if services.restarted:
        typer.echo(f"started again what had stopped: {', '.join(services.restarted)}; the others kept running")
    typer.echo(f"Prefect UI:   {services.prefect_api.removesuffix('/api')}")
    typer.echo(f"MLflow:       {services.mlflow}")
    typer.echo(f"receiver:     {services.receiver}")
    typer.echo("use them from your shell with:")
    for name, value in services.exports().items():
        typer.echo(f"  export {name}={value}")
    typer.echo(
        f"then set the alias: MlflowClient().set_registered_model_alias(NAME, {settings.triggers.alias!r}, VERSION)"
    )


_QUICK_EXIT: list[bool] = []  # set by commands that leave nothing to clean up (see main)


def main() -> None:
    """Console-script entry point.

    A command that leaves nothing running and nothing unsaved (``profile``) ends the process with
    ``os._exit`` once its output is flushed: tearing down torch and transformers at interpreter
    exit took 1.2 s of a 5 s ``nodewise profile`` on a 2-core machine (mypy's ``hard_exit`` does
    the same). Under a test runner (``app`` called directly) nothing changes.
    """
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except SystemExit as e:
        if _QUICK_EXIT and e.code in (0, None):
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        raise
