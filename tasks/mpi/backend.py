"""DeepSpeed over MPI as a backend (tasks/backend.py's ``Backend``): a model across several nodes,
every rank in every request."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from nodewise.core.settings import ServeSettings, Settings
from tasks.backend import Action, Deployed, WatchPass
from tasks.planning.placement import DEEPSPEED_MPI, PlacementPlan
from tasks.planning.registry import ResolvedModel
from tasks.records import DeploymentRecord
from tasks.smoke import endpoint_health


class DeepSpeedMpi:
    """One group of ranks under mpirun per model (and its front); restarted whole."""

    names: tuple[str, ...] = (DEEPSPEED_MPI,)
    rollouts: bool = False  # two groups' shadow and canary traffic is not built (flows/rollout.py says so)
    local: bool = True

    def deploy(
        self,
        model: ResolvedModel,
        plan: PlacementPlan,
        settings: Settings,
        serve: ServeSettings,
        previous: DeploymentRecord | None,
    ) -> Deployed:
        """The ranks launched (beside the running group when there is room, else in its place),
        waited for and smoke-tested against the whole model; ``deploy_cluster`` keeps or relaunches
        the previous group on a failure, and says how the upgrade went (tasks/mpi/upgrade.py)."""
        from tasks.mpi.deploy import build_deepspeed_spec, deploy_cluster, smoke_test_lm

        spec = build_deepspeed_spec(model, plan, settings)
        endpoint, smoke, upgrade = deploy_cluster(
            spec, plan, settings, lambda endpoint: smoke_test_lm(endpoint, model, spec, settings.smoke)
        )
        said = "matched the whole model" if smoke.compared else "answered"
        summary = f"{model.pinned_uri} serves at {endpoint} on {plan.ranks} DeepSpeed ranks: smoke test {said}"
        replaced = None if upgrade.mode == "first" else upgrade.line()
        return Deployed(
            spec=spec.model_dump(mode="json"),
            endpoint=endpoint,
            replicas=1,
            canary=smoke.request,
            summary=summary + (f"; {replaced}" if replaced else ""),
            replaced=replaced,
        )

    def stop(self, settings: Settings, app_names: list[str]) -> list[str]:
        done = []
        for name in sorted(app_names):
            done.extend(self._stop_one(settings, name))
        return done

    def retire(self, settings: Settings, app_name: str) -> None:
        self._stop_one(settings, app_name)

    def _stop_one(self, settings: Settings, app_name: str) -> list[str]:
        from tasks.mpi.front import stop_front
        from tasks.mpi.launcher import stop_cluster

        return [*stop_cluster(settings, app_name), *stop_front(settings, app_name)]  # the front outlives restarts

    def leftovers(self, settings: Settings) -> set[str]:
        from tasks.mpi.records import launched_apps

        return launched_apps(settings)

    def watch(self, settings: Settings, record: DeploymentRecord, this: WatchPass) -> list[Action]:
        from tasks.mpi.watch import watch_group

        return watch_group(settings, record, this)

    def status(self, settings: Settings, records: list[DeploymentRecord]) -> dict[str, dict[str, Any]]:
        rows = {}
        for record in records:
            where = where_ranks_run(settings, record.app_name)
            rows[record.app_name] = {
                "ranks": record.spec.get("tp_size", 1),
                **where,
                "health": endpoint_health(where.get("endpoint", record.endpoint)),
            }
        return rows

    def nodes(self, settings: Settings) -> dict[str, Any] | None:
        return None  # its hosts are each deployment's (status's ``hosts``)

    def state(self, settings: Settings, record: DeploymentRecord, watch: dict[str, Any]) -> str | None:
        from tasks.mpi.health import exit_code
        from tasks.mpi.records import read_cluster

        cluster = read_cluster(settings, record.app_name)
        return "down" if cluster is None or exit_code(cluster) is not None else None

    def logs(self, settings: Settings, app_name: str, lines: int, record: DeploymentRecord | None) -> str | None:
        """mpirun's output (every rank's), kept after the job stops."""
        from tasks.mpi.health import app_log

        return app_log(settings, app_name, lines)

    def scrape_targets(
        self, settings: Settings, record: DeploymentRecord, deployed: bool
    ) -> dict[str | None, str | None] | None:
        """Rank 0's serving address (its ``/metrics``), read from the job's record: a restarted group
        may have moved hosts."""
        from tasks.mpi.records import read_cluster

        cluster = read_cluster(settings, record.app_name)
        if cluster is None and not deployed:
            return None
        return {None: urlsplit(cluster.endpoint if cluster is not None else record.endpoint).netloc}


def where_ranks_run(settings: Settings, app_name: str) -> dict[str, Any]:
    """A DeepSpeed job's hosts now: each rank's, the spares, and rank 0's endpoint (it moves with rank 0)."""
    from nodewise.core.errors import ClusterUnavailable
    from tasks.mpi.front import front_state, hold_line, read_front
    from tasks.mpi.records import read_cluster, read_placement

    try:
        placement = read_placement(settings, app_name)
    except ClusterUnavailable:
        return {}
    where: dict[str, Any] = {
        "hosts": placement.hosts,
        "rank_hosts": [h for h in placement.hosts for _ in range(placement.ranks_per_host)],
        "spare_hosts": placement.spares,
    }
    cluster = read_cluster(settings, app_name)
    front = read_front(settings, app_name)
    if front is not None:  # users call the front, which outlives the group; rank 0 sits behind it
        where["endpoint"] = front.endpoint
        state = front_state(front)
        where["front"] = (hold_line(state) or "serving") if state is not None else "not answering"
        if cluster is not None:
            where["rank0_endpoint"] = cluster.endpoint
    elif cluster is not None:
        where["endpoint"] = cluster.endpoint
    return where
