"""Registry-driven rollouts: a challenger beside the champion, then promoted or rolled back.

``start-rollout`` runs when the challenger alias (``rollout.challenger_alias``, default
``challenger``) is set on a version of a served model: it deploys that version as the model's
challenger (its own Serve app, no HTTP route) and tells the champion's replicas to copy requests
to it (``shadow``) or have it answer a share of them (``canary``), as the model's
``nodewise.rollout.*`` tags say.

``decide-rollouts`` runs on a schedule. For each rollout it adds up what the champion's replicas
saw and, once the challenger has had ``min_requests`` calls, either rolls it back (error rate, p99
latency ratio or agreement past its threshold) or advances a canary to its next share or promotes
it: the champion's app rolls over to the challenger's version (0 failed requests), the alias
``champion`` moves to it and the one it replaced becomes ``previous``. Each step is a Prefect
event (``nodewise.rollout.<step>``) and an artifact (a table and a chart), and its outcome is
written on the version's ``nodewise.rollout.*`` tags.

A decision is written down (``<state>/rollouts.json`` and the tags) before it is carried out, and
every step of carrying it out can be done twice: a run killed half-way is finished by the next.
"""

from __future__ import annotations

import math

from prefect import flow
from prefect.events import emit_event

from nodewise.core.errors import DeployFailed, DoesNotFit, NotDeployed, UnsupportedModel
from nodewise.core.settings import Settings, current_settings
from tasks.backends import backend_for
from tasks.records import DeploymentRecord, app_name_for, deploy_lock, get_record
from tasks.rollout import store
from tasks.rollout.policy import Decision, Rollout, Summary, decide, now, summarize, tags_for
from tasks.steps import (
    deploy_challenger_task,
    gather_stats_task,
    plan_placement_task,
    profile_model_task,
    publish_rollout_task,
    read_inventory_task,
    resolve_model_task,
    route_task,
)
from tasks.triggers.promotion import PREVIOUS_ALIAS, alias_target, record_outcome


@flow(name="start-rollout", log_prints=True, validate_parameters=True)
def start_rollout(model_name: str, version: str | None = None, inventory: str = "local") -> str:
    """Deploy the challenger alias's version (or ``version``) beside ``model_name``'s champion.

    Args:
        model_name: the registered model's name; its champion must be served here.
        version: the version to try (default: the challenger alias's).
        inventory: where the challenger may run, as a deploy's (``local``, ``ray[:ADDRESS]``, a YAML file).
    """
    from tasks.planning.plan import requested
    from tasks.planning.registry import make_client
    from tasks.planning.serve_config import serve_settings_for
    from tasks.rayserve.apps import build_spec
    from tasks.rollout.serve import challenger_app_for, connect_cluster

    settings = current_settings()
    client = make_client(settings.tracking_uri, settings.registry_uri)
    alias = settings.rollout.challenger_alias
    with deploy_lock(settings.state, model_name):
        wanted = str(version) if version else alias_target(client, model_name, alias)
        model = resolve_model_task(f"models:/{model_name}/{wanted}", settings.tracking_uri, settings.registry_uri)
        rules = store.rules_for(model, settings.rollout)
        app = app_name_for(model_name)
        record = get_record(settings.state.records, app)
        if record is None:
            raise NotDeployed(
                f"{model_name} is not served here, so version {wanted} has no champion to be tried beside: "
                f"deploy the champion first (nodewise deploy models:/{model_name}@champion)"
            )
        if record.model_version == wanted:
            print(f"version {wanted} of {model_name} is the champion already: nothing to try")
            return f"version {wanted} is the champion"
        current = store.get(settings.state.rollouts, model_name)
        if current is not None and current.phase == "running" and current.challenger_version == wanted:
            route_task(record, settings, connect_cluster(settings), current.config())  # as it should be
            print(f"{model_name}: {current.describe()} (already running)")
            return current.describe()
        if current is not None:  # a decision half carried out, or another challenger: finish it first
            if current.phase == "running":
                reason = f"the {alias!r} alias moved to version {wanted}"
                current = store.save(
                    settings.state.rollouts,
                    current.model_copy(
                        update={"phase": "rolling_back", "decision": Decision(action="rollback", reason=reason)}
                    ),
                )
            _carry_out(current, settings, client)
            record = get_record(settings.state.records, app)
            if record is None or record.model_version == wanted:
                return f"version {wanted} is the champion" if record else f"{model_name} is not served here"
        if not backend_for(record.backend).rollouts:  # a challenger cannot run beside this champion
            _refuse_multi_node(model_name, wanted, record, inventory, settings)
        if record.spec.get("engine"):
            raise UnsupportedModel(
                f"{model_name} is served through the text-generation engine: shadow and canary rollouts "
                "compare /invocations answers and are not built for it; promote the version with the "
                "champion alias instead"
            )
        remote = connect_cluster(settings)
        serve = requested(serve_settings_for(model, settings.serve), None)
        ray = settings.ray
        nodes = read_inventory_task(inventory, ray.num_cpus, ray.max_added_nodes, ray.added_node_cpus)
        profile = profile_model_task(model, batch_size=serve.max_batch_size, device=nodes.device_class)
        plan = plan_placement_task(profile, nodes, settings, serve, None)
        if not plan.fits or plan.backend is None or not backend_for(plan.backend).rollouts:
            raise DoesNotFit(f"version {wanted} cannot be tried beside the champion on one node: {plan.explain()}")
        challenger = challenger_app_for(app)
        spec = build_spec(model, plan, settings, serve).model_copy(
            update={"app_name": challenger, "route_prefix": f"/{challenger}"}
        )
        rollout = Rollout(
            model_name=model_name,
            app_name=app,
            challenger_app=challenger,
            champion_version=record.model_version,
            challenger_version=wanted,
            mode=rules.mode,
            shares=list(rules.share),
            rules=rules,
            inventory=inventory,
        )
        try:
            deploy_challenger_task(spec, settings, remote, record.canary)
        except DeployFailed as e:
            reason = f"version {wanted} was not started beside the champion: {e}"
            store.set_tags(client, model_name, wanted, tags_for(rollout, "not_started", None, reason))
            store.delete_alias_if(client, model_name, alias, wanted)
            store.count_outcome(settings.state.prometheus, model_name, "failed")
            _event("failed", rollout, reason)
            raise DeployFailed(f"{reason} (the {alias!r} alias was removed)") from e
        store.save(settings.state.rollouts, rollout)
        route_task(record, settings, remote, rollout.config())
        store.set_tags(client, model_name, wanted, tags_for(rollout, rollout.mode, None, None))
        _event("started", rollout, f"{rollout.describe()}")
        print(f"{model_name}: {rollout.describe()}")
        return rollout.describe()


@flow(name="decide-rollouts", log_prints=True, validate_parameters=True)
def decide_rollouts(model_name: str | None = None) -> list[str]:
    """Judge every rollout (or ``model_name``'s) on what its champion's replicas saw; act on it.

    Args:
        model_name: only this model's rollout (default: every one).
    """
    from tasks.planning.registry import make_client

    settings = current_settings()
    client = make_client(settings.tracking_uri, settings.registry_uri)
    outcomes = []
    for name in sorted(store.load(settings.state.rollouts)):
        if model_name and name != model_name:
            continue
        with deploy_lock(settings.state, name):
            rollout = store.get(settings.state.rollouts, name)  # again, under the lock
            if rollout is not None:
                outcomes.append(_judge(rollout, settings, client))
    if model_name and not outcomes:
        print(f"{model_name} has no rollout under way")
    return outcomes


def _judge(rollout: Rollout, settings: Settings, client: object) -> str:
    from tasks.rollout.serve import connect_cluster

    if rollout.phase != "running":
        return _carry_out(rollout, settings, client)
    record = get_record(settings.state.records, rollout.app_name)
    alias = settings.rollout.challenger_alias
    summary = Summary()
    if record is None or record.model_version != rollout.champion_version:
        serving = record.model_version if record else None
        if serving == rollout.challenger_version:
            decision = Decision(action="promote", reason=f"version {serving} was made the champion by hand")
        else:
            decision = Decision(
                action="rollback",
                reason=f"the champion changed from {rollout.champion_version} to {serving} meanwhile",
            )
    elif (pointed := store.alias_version(client, rollout.model_name, alias)) != rollout.challenger_version:
        where = f"moved to version {pointed}" if pointed else "removed"
        decision = Decision(action="rollback", reason=f"the alias {alias!r} was {where}")
    else:
        remote = connect_cluster(settings)
        summary = summarize(gather_stats_task(rollout.app_name), rollout.config().epoch)
        decision = decide(rollout, summary)
        if not summary.replicas:  # none routes to the challenger (a start killed half-way, say): again
            route_task(record, settings, remote, rollout.config())
            reason = "no champion replica reports this rollout (none running, or not told of it: told again)"
            decision = Decision(action="wait", reason=reason)
    rollout = rollout.model_copy(
        update={"last": {"at": now(), "decision": decision.model_dump(), "summary": summary.model_dump()}}
    )
    if summary.challenger_calls or decision.action != "wait":
        publish_rollout_task(rollout, summary, decision)
    print(f"{rollout.model_name}: {rollout.describe()}: {decision.action} ({decision.reason})")
    if decision.action == "wait":
        store.save(settings.state.rollouts, rollout)
        return f"{rollout.model_name}: wait ({decision.reason})"
    if decision.action == "advance":
        return _advance(rollout, settings, client, record, summary, decision)
    # written down before anything is done about it: a run killed from here on is finished by the next
    phase = "promoting" if decision.action == "promote" else "rolling_back"
    rollout = store.save(settings.state.rollouts, rollout.model_copy(update={"phase": phase, "decision": decision}))
    tags = tags_for(rollout, phase, summary if summary.challenger_calls else None, decision.reason)
    store.set_tags(client, rollout.model_name, rollout.challenger_version, tags)
    return _carry_out(rollout, settings, client)


def _advance(
    rollout: Rollout,
    settings: Settings,
    client: object,
    record: DeploymentRecord | None,
    summary: Summary,
    decision: Decision,
) -> str:
    from tasks.rollout.serve import connect_cluster

    assert record is not None
    rollout = rollout.model_copy(update={"step": rollout.step + 1, "step_started_at": now()})
    store.save(settings.state.rollouts, rollout)
    route_task(record, settings, connect_cluster(settings), rollout.config())
    store.set_tags(client, rollout.model_name, rollout.challenger_version, tags_for(rollout, "canary", summary, None))
    _event("advanced", rollout, decision.reason)
    return f"{rollout.model_name}: advanced to {rollout.share:.0%}"


def _carry_out(rollout: Rollout, settings: Settings, client: object) -> str:
    """Finish the decision written down in ``rollout`` (every step safe to repeat)."""
    assert rollout.decision is not None
    if rollout.phase == "promoting":
        return _promote(rollout, settings, client)
    return _roll_back(rollout, settings, client)


def _promote(rollout: Rollout, settings: Settings, client: object) -> str:
    from flows.deploy import deploy_model
    from tasks.rollout.serve import champion_serves, connect_cluster, remove_challenger

    name, version, before = rollout.model_name, rollout.challenger_version, rollout.champion_version
    assert rollout.decision is not None
    record = get_record(settings.state.records, rollout.app_name)
    if record is None or record.model_version != version:
        remote = connect_cluster(settings)
        if record is not None and record.model_version == before and champion_serves(rollout.challenger_app):
            # traffic moves first: the challenger answers every request (the champion's replicas
            # only reconfigured, in about a second), then the champion's app rolls over to its
            # version, the old replicas handing requests over until the new ones are ready
            everything = rollout.config().model_copy(update={"mode": "canary", "share": 1.0})
            route_task(record, settings, remote, everything)
        deploy_model(f"models:/{name}/{version}", inventory=rollout.inventory)
    connect_cluster(settings)
    remove_challenger(rollout.app_name)
    client.set_registered_model_alias(name, settings.triggers.alias, version)  # type: ignore[attr-defined]
    if before != version:
        client.set_registered_model_alias(name, PREVIOUS_ALIAS, before)  # type: ignore[attr-defined]
    if before != version:
        store.set_tags(client, name, before, {"nodewise.rollout.status": f"replaced by version {version}"})
    _finish(rollout, settings, client, "promoted", "promoted from rollout")
    print(f"{name}: version {version} promoted ({rollout.decision.reason}); {before} is {PREVIOUS_ALIAS!r}")
    return f"{name}: promoted version {version}"


def _roll_back(rollout: Rollout, settings: Settings, client: object) -> str:
    from tasks.rollout.serve import champion_serves, connect_cluster, remove_challenger

    name, version = rollout.model_name, rollout.challenger_version
    assert rollout.decision is not None
    remote = connect_cluster(settings)
    record = get_record(settings.state.records, rollout.app_name)
    if record is not None and backend_for(record.backend).rollouts and champion_serves(rollout.app_name):
        route_task(record, settings, remote, None)  # the champion answers everything again
    remove_challenger(rollout.app_name)
    _finish(rollout, settings, client, "rolled_back", "rolled back")
    print(f"{name}: version {version} rolled back ({rollout.decision.reason})")
    return f"{name}: rolled back version {version}"


def _finish(rollout: Rollout, settings: Settings, client: object, status: str, outcome: str) -> None:
    """The end of a carried-out decision: the challenger alias gone (if still on the version), the
    outcome on its tags, in the history and as an event; the rollout forgotten."""
    name, version = rollout.model_name, rollout.challenger_version
    assert rollout.decision is not None
    store.delete_alias_if(client, name, settings.rollout.challenger_alias, version)
    summary = Summary.model_validate((rollout.last or {}).get("summary") or {})
    tags = tags_for(rollout, status, summary if summary.challenger_calls else None, rollout.decision.reason)
    store.set_tags(client, name, version, tags)
    record_outcome(settings.state.promotions, name, version, f"{outcome}: {rollout.decision.reason}")
    store.count_outcome(settings.state.prometheus, name, status)
    _event(status, rollout, rollout.decision.reason)
    store.forget(settings.state.rollouts, name)


def _event(step: str, rollout: Rollout, reason: str) -> None:
    name = rollout.model_name
    emit_event(
        event=f"nodewise.rollout.{step}",
        resource={
            "prefect.resource.id": f"mlflow.model.{name}",
            "prefect.resource.name": name,
            "nodewise.model": name,
        },
        payload={
            "model": name,
            "champion": rollout.champion_version,
            "challenger": rollout.challenger_version,
            "mode": rollout.mode,
            "share": rollout.share,
            "reason": reason,
        },
    )


def _refuse_multi_node(model_name: str, version: str, record: DeploymentRecord, inventory: str, s: Settings) -> None:
    """A DeepSpeed champion: what a second group would need, against what the inventory has."""
    from tasks.planning.inventory_sources import read_inventory

    nodes = read_inventory(inventory, s.ray.num_cpus, s.ray.max_added_nodes, s.ray.added_node_cpus)
    ranks = int(record.spec.get("tp_size", 1))
    per_node = max(1, max((len(n.gpus) for n in nodes.nodes), default=0) or 1)
    group = math.ceil(ranks / per_node)
    have = len(nodes.nodes)
    room = (
        f"the inventory ({inventory}) has {have} node(s); the champion's group of {ranks} ranks takes "
        f"{group}, a challenger's group as large another {group}"
    )
    if have < 2 * group:
        raise DoesNotFit(
            f"version {version} of {model_name} cannot be tried beside its DeepSpeed champion: {room}, "
            f"{2 * group} in all; add {2 * group - have} node(s), or promote it with the champion alias"
        )
    raise UnsupportedModel(
        f"version {version} of {model_name} was not started: {room}, which it could hold, but shadow and canary "
        "traffic between two DeepSpeed groups is not built yet; promote it with the champion alias"
    )
