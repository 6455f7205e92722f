"""Ray Serve as a backend (tasks/backend.py's ``Backend``): a model on one node, as Serve replicas."""

from __future__ import annotations

from typing import Any

from nodewise.core.errors import DeployFailed
from nodewise.core.settings import ServeSettings, Settings
from tasks.backend import Action, Deployed, WatchPass
from tasks.planning.placement import RAY_SERVE, PlacementPlan
from tasks.planning.registry import ResolvedModel
from tasks.records import DeploymentRecord
from tasks.smoke import endpoint_health


class RayServe:
    """Replicas of one Serve app per model; the watchdog restarts a sick replica alone."""

    names: tuple[str, ...] = (RAY_SERVE,)
    rollouts: bool = True  # a challenger's app beside the champion's (tasks/rollout/serve.py)
    local: bool = True

    def deploy(
        self,
        model: ResolvedModel,
        plan: PlacementPlan,
        settings: Settings,
        serve: ServeSettings,
        previous: DeploymentRecord | None,
    ) -> Deployed:
        """The model's Serve app (the cluster started if it is the local one), smoke-tested; on a
        failure the previous version's app is put back (or none, where it served elsewhere)."""
        from tasks.rayserve.apps import build_spec, deploy_app, rollback
        from tasks.rayserve.cluster import connect, ensure_cluster
        from tasks.smoke import smoke_test

        cluster = ensure_cluster(settings)
        connect(cluster)
        spec = build_spec(model, plan, settings, serve)
        mine = previous if previous is not None and previous.backend in self.names else None
        remote = not cluster.owned
        try:
            endpoint = deploy_app(spec, settings, remote)
            smoke = smoke_test(endpoint, model, settings.smoke)
        except DeployFailed as e:
            outcome = rollback(spec, mine.spec if mine is not None else None, settings, remote)
            if previous is not None and mine is None:
                outcome += f"; version {previous.model_version} keeps serving where it was ({previous.backend})"
            raise DeployFailed(f"{e} (rolled back: {outcome})") from e
        said = "matched the model" if smoke.compared else "answered"
        return Deployed(
            spec=spec.model_dump(mode="json"),
            endpoint=endpoint,
            replicas=plan.replicas,
            canary=smoke.request,
            summary=f"{model.pinned_uri} serves at {endpoint}: smoke test {said}",
        )

    def stop(self, settings: Settings, app_names: list[str]) -> list[str]:
        """Delete the apps on an external cluster; stop the local Ray instance, apps and all."""
        from tasks.rayserve.apps import delete_app
        from tasks.rayserve.cluster import connect, current_cluster, stop_local_cluster

        done = []
        if settings.ray.address:
            if app_names:
                connect(current_cluster(settings))
                for name in app_names:
                    delete_app(name)
                    done.append(f"deleted Serve app {name}")
        elif stop_local_cluster(settings):
            done.extend(f"deleted Serve app {name}" for name in app_names)
            done.append("stopped the local Ray instance")
        return done

    def retire(self, settings: Settings, app_name: str) -> None:
        from tasks.rayserve.apps import delete_app
        from tasks.rayserve.cluster import connect, current_cluster

        cluster = current_cluster(settings)
        if cluster is not None:
            connect(cluster)
            delete_app(app_name)

    def leftovers(self, settings: Settings) -> set[str]:
        return set()  # an app without a record is deleted with the local instance, or by the next deploy

    def watch(self, settings: Settings, record: DeploymentRecord, this: WatchPass) -> list[Action]:
        from tasks.rayserve.watch import watch_app

        return watch_app(settings, record, this)

    def status(self, settings: Settings, records: list[DeploymentRecord]) -> dict[str, dict[str, Any]]:
        """Each app's replicas where Serve placed them, its autoscaling bounds and health (a model
        scaled to zero is not pinged: a ping would start a replica)."""
        from tasks.rayserve.watch import replica_nodes

        placed = replica_nodes(settings, [r.app_name for r in records])
        rows: dict[str, dict[str, Any]] = {}
        for record in records:
            row: dict[str, Any] = {"ranks": None}
            spec = record.spec
            if spec.get("max_replicas", 1) > spec.get("min_replicas", 1):
                row["autoscaling"] = {
                    "min_replicas": spec["min_replicas"],
                    "max_replicas": spec["max_replicas"],
                    "ceiling": spec.get("ceiling_reason") or "max_replicas",
                }
            if record.app_name in placed:
                row["replica_nodes"] = placed[record.app_name]
            idle = spec.get("min_replicas") == 0 and record.app_name in placed and not placed[record.app_name]
            row["health"] = (
                "scaled to zero (the next request starts a replica)" if idle else endpoint_health(record.endpoint)
            )
            rows[record.app_name] = row
        return rows

    def nodes(self, settings: Settings) -> dict[str, Any] | None:
        """The Ray nodes: the live ones, those gone, and how many the local instance may add."""
        from tasks.rayserve.watch import cluster_nodes

        nodes = cluster_nodes(settings)
        if nodes is None:
            return None
        return {**nodes, "max_added_nodes": None if settings.ray.address else settings.ray.max_added_nodes}

    def state(self, settings: Settings, record: DeploymentRecord, watch: dict[str, Any]) -> str | None:
        if record.spec.get("min_replicas") == 0 and watch.get("running") == 0:
            return "scaled_to_zero"  # a /ping would wake it: not asked
        return None

    def logs(self, settings: Settings, app_name: str, lines: int, record: DeploymentRecord | None) -> str | None:
        if record is None:
            return None
        where = f"{settings.state.ray_temp}/session_latest/logs" if not settings.ray.address else "the cluster's nodes"
        return f"{app_name} runs on Ray Serve: its replicas log to {where} (files named replica_{app_name}_*)"

    def scrape_targets(
        self, settings: Settings, record: DeploymentRecord, deployed: bool
    ) -> dict[str | None, str | None] | None:
        """Right after a deploy, each running replica's own ``/metrics`` address (the caller is
        connected); later the watchdog follows the replicas (``WatchPass.scrape_targets``)."""
        if not deployed:
            return None
        from tasks.rayserve.replicas import metrics_addresses

        return dict(metrics_addresses(record.app_name))
