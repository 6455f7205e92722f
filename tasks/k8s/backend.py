"""Kubernetes as a backend (tasks/backend.py's ``Backend``): what ``nodewise render --apply`` (or a
promotion with ``target=kubernetes``) put on a cluster, recorded in ``k8s_deployments.json``.

Its deploy path is ``tasks/k8s/deploy.py`` (``render_model`` then ``apply_rendered``: planned from
a model URI and an inventory, not from a local plan), so ``deploy`` here refuses; ``nodewise down``
leaves a cluster's workloads alone (``render --delete`` removes them).
"""

from __future__ import annotations

import time
from typing import Any

from nodewise.core.errors import InvalidInput
from nodewise.core.settings import ServeSettings, Settings
from tasks.backend import Action, Deployed, WatchPass
from tasks.planning.placement import PlacementPlan
from tasks.planning.registry import ResolvedModel
from tasks.records import DeploymentRecord

WORKLOADS = ("RayService", "MPIJob", "LeaderWorkerSet")  # tasks/k8s/watch.py's ``workload``


def backend_name(kind: str) -> str:
    """A record's ``backend`` for a workload of ``kind``: ``k8s-rayservice``, ..."""
    return f"k8s-{kind.lower()}"


class Kubernetes:
    """A RayService, MPIJob or LeaderWorkerSet and its pods; the watchdog deletes a sick pod (a
    RayService's alone, a rank group's with its group)."""

    names: tuple[str, ...] = tuple(backend_name(kind) for kind in WORKLOADS)
    rollouts: bool = False
    local: bool = False

    def deploy(
        self,
        model: ResolvedModel,
        plan: PlacementPlan,
        settings: Settings,
        serve: ServeSettings,
        previous: DeploymentRecord | None,
    ) -> Deployed:
        raise InvalidInput(
            f"{model.pinned_uri}: a deploy to Kubernetes goes through `nodewise render {model.pinned_uri} --apply` "
            "(or the promotion flow's target=kubernetes)"
        )

    def stop(self, settings: Settings, app_names: list[str]) -> list[str]:
        return []  # `nodewise down` stops this machine's processes; `render --delete` removes a workload

    def retire(self, settings: Settings, app_name: str) -> None:
        return None

    def leftovers(self, settings: Settings) -> set[str]:
        return set()

    def watch(self, settings: Settings, record: DeploymentRecord, this: WatchPass) -> list[Action]:
        return watch_workload(settings, record, this)

    def status(self, settings: Settings, records: list[DeploymentRecord]) -> dict[str, dict[str, Any]]:
        health = "on Kubernetes: the watchdog checks its pods (kubectl shows them)"
        return {r.app_name: {"ranks": None, "health": health} for r in records}

    def nodes(self, settings: Settings) -> dict[str, Any] | None:
        return None

    def state(self, settings: Settings, record: DeploymentRecord, watch: dict[str, Any]) -> str | None:
        return "serving"  # as the watchdog last judged its pods: no probe from here

    def logs(self, settings: Settings, app_name: str, lines: int, record: DeploymentRecord | None) -> str | None:
        return None

    def scrape_targets(
        self, settings: Settings, record: DeploymentRecord, deployed: bool
    ) -> dict[str | None, str | None] | None:
        return None  # Prometheus finds its pods itself (the PodMonitor and annotations render writes)


def watch_workload(settings: Settings, record: DeploymentRecord, this: WatchPass) -> list[Action]:
    """One check of ``record``'s pods (the Kubernetes backend's ``watch``): a sick RayService pod
    deleted alone, a sick rank's group restarted whole, within the budget."""
    from kubernetes.client.exceptions import ApiException

    from nodewise.core.errors import NodewiseError
    from tasks.k8s import apply as k8s_apply
    from tasks.k8s.watch import diagnose, list_pods, workload
    from tasks.kubeapi import api_client

    main = workload(record.spec["objects"])
    namespace, name = main["metadata"]["namespace"], main["metadata"]["name"]
    this.watch.pending = None  # deleting pods is idempotent: a killed pass's action is simply judged again
    try:
        api = api_client()
        pods = list_pods(api, namespace, name)
    except (NodewiseError, ApiException) as e:
        return this.degraded(f"the Kubernetes API did not answer: {str(e).splitlines()[0]}")
    pod, cause, degraded = diagnose(main["kind"], pods)
    done = this.degraded(degraded)
    pending = f"group restart: {name}"
    if pod is None or cause is None:
        return done
    if main["kind"] == "RayService":  # one replica's pod: the others keep serving

        def restart() -> tuple[float, str]:
            started = time.monotonic()
            outcome = k8s_apply.restart_pod(api, namespace, pod["metadata"]["name"])
            return time.monotonic() - started, outcome

        done.append(
            this.budgeted("nodewise.replica.restarted", cause, f"pod {pod['metadata']['name']}", restart, pending)
        )
        return done

    def restart_group() -> tuple[float, str]:  # a rank group: every rank together
        started = time.monotonic()
        outcome = "; ".join(k8s_apply.restart_group(api, main))
        return time.monotonic() - started, outcome

    target = f"all ranks of {main['kind']} {namespace}/{name}"
    done.append(this.budgeted("nodewise.cluster.restarted", cause, target, restart_group, pending))
    return done
