"""The one interface every backend implements, and the watchdog's words it speaks.

A backend (Ray Serve replicas, DeepSpeed ranks under mpirun, a workload on Kubernetes) lives in
its own room (``tasks/rayserve``, ``tasks/mpi``, ``tasks/k8s``) and implements ``Backend`` in that
room's ``backend.py``; ``tasks/backends.py`` registers them, in one place. The flows, the watchdog,
``nodewise status`` / ``logs`` / ``down``, the rollouts and the metrics call ``backend_for(name)``
and never compare backend names. Adding a backend is its room and one line of registration (and,
for ``deploy``, the planner's rule that chooses it: ``tasks/planning/placement.py``).

This module is below the rooms: it imports no backend, so each room can implement it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, Field

from nodewise.core.settings import ServeSettings, Settings
from tasks.planning.placement import PlacementPlan
from tasks.planning.registry import ResolvedModel
from tasks.records import DeploymentRecord

ActionKind = Literal[
    "nodewise.replica.restarted",
    "nodewise.replica.replaced",
    "nodewise.cluster.restarted",
    "nodewise.deployment.degraded",
    "nodewise.deployment.recovered",
    "nodewise.deployment.failed",
    "nodewise.deployment.backoff",
    "nodewise.front.held",
]


class Action(BaseModel):
    """One thing the watchdog saw or did."""

    at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    event: ActionKind
    app: str
    model_uri: str
    version: str
    cause: str
    target: str = "all ranks"
    duration_s: float | None = None
    outcome: str = ""
    hosts_before: list[str] | None = Field(default=None, description="A multi-node job's hosts before a restart.")
    hosts_after: list[str] | None = Field(default=None, description="... and after it (a host that is down replaced).")
    counts: dict[str, int] | None = Field(
        default=None, description="nodewise.front.held: held, retried, continued, refused since the last pass."
    )


class AppWatch(BaseModel):
    """What the watchdog remembers of one deployment."""

    restarts: list[float] = Field(default_factory=list, description="Epoch seconds of recent restarts.")
    failed: str | None = Field(default=None, description="Why the budget ran out; the watchdog leaves it alone.")
    pending: str | None = Field(default=None, description="A restart begun and not finished.")
    degraded: str | None = Field(default=None, description="The degradation last reported (reported once).")
    version: str | None = None
    deployed_at: str | None = Field(default=None, description="The deploy this budget belongs to.")
    running: int | None = Field(default=None, description="Replicas running at the last pass (Ray Serve).")
    replicas: list[str] = Field(default_factory=list, description="Replica ids seen at the last pass (Ray Serve).")
    restarted: list[str] = Field(default_factory=list, description="Replica ids this watchdog restarted itself.")
    front: dict[str, int] = Field(default_factory=dict, description="The front's counts at the last pass (DeepSpeed).")


Restart = Callable[[], tuple[float, str]]
"""A repair: returns the seconds it took and its outcome."""


class WatchPass(Protocol):
    """What the watchdog engine (tasks/watchdog/engine.py) gives a backend's check of one deployment:
    its memory of it, and the budget, degradation and scrape-target bookkeeping, done the same for all."""

    watch: AppWatch

    def action(self, event: ActionKind, cause: str, **extra: Any) -> Action:
        """An action on this deployment."""
        ...

    def degraded(self, cause: str | None) -> list[Action]:
        """A degradation reported when it starts or changes, its end once (None: healthy)."""
        ...

    def budgeted(
        self, event: ActionKind, cause: str, target: str, restart: Restart, pending: str = "cluster restart"
    ) -> Action:
        """Run ``restart`` if the restart budget allows it; else say why not (or mark it failed)."""
        ...

    def scrape_targets(self, targets: dict[str | None, str | None]) -> None:
        """This deployment's scrape targets as just seen (tasks/metrics/targets.py's ``write_targets``)."""
        ...


class Deployed(BaseModel):
    """What a backend's ``deploy`` started and checked: the record is made of it."""

    spec: dict[str, Any] = Field(description="The backend's spec, as JSON (the record keeps it).")
    endpoint: str
    replicas: int
    canary: dict[str, Any] = Field(description="The smoke test's request: the watchdog's canary.")
    summary: str = Field(description="One line for the flow's log: where it serves, what the smoke test saw.")
    replaced: str | None = Field(
        default=None,
        description="How it took over from the version that was serving, in one line (None: there was none, or "
        "the backend has nothing to say of it). The record keeps it; `nodewise status` shows it.",
    )


@runtime_checkable
class Backend(Protocol):
    """The operations every backend implements (each delegating to its room's functions)."""

    names: tuple[str, ...]
    """The ``backend`` values of the records it owns (``DeploymentRecord.backend``)."""
    rollouts: bool
    """Whether a challenger can run beside its champion (tasks/rollout)."""
    local: bool
    """Whether its records are in ``deployments.json`` (``deploy``, ``down``), else ``k8s_deployments.json``."""

    def deploy(
        self,
        model: ResolvedModel,
        plan: PlacementPlan,
        settings: Settings,
        serve: ServeSettings,
        previous: DeploymentRecord | None,
    ) -> Deployed:
        """Start ``model`` as ``plan`` places it, smoke-test it, roll back on failure (``DeployFailed``)."""
        ...

    def stop(self, settings: Settings, app_names: list[str]) -> list[str]:
        """Stop these deployments (all of them: ``down``, which may leave this backend's own processes
        stopped too); what was done."""
        ...

    def retire(self, settings: Settings, app_name: str) -> None:
        """Stop one deployment that moved to another backend (after the other answers)."""
        ...

    def leftovers(self, settings: Settings) -> set[str]:
        """Deployments it runs that may have no record (a deploy killed half-way)."""
        ...

    def watch(self, settings: Settings, record: DeploymentRecord, this: WatchPass) -> list[Action]:
        """One watchdog check of ``record``, and its repair within the budget."""
        ...

    def status(self, settings: Settings, records: list[DeploymentRecord]) -> dict[str, dict[str, Any]]:
        """``nodewise status``'s fields of each of its deployments (health included), by app name."""
        ...

    def nodes(self, settings: Settings) -> dict[str, Any] | None:
        """The nodes it runs on, for status (None: not its to say)."""
        ...

    def state(self, settings: Settings, record: DeploymentRecord, watch: dict[str, Any]) -> str | None:
        """The exporter's state of a deployment the watchdog has not marked (None: ask its ``/ping``)."""
        ...

    def logs(self, settings: Settings, app_name: str, lines: int, record: DeploymentRecord | None) -> str | None:
        """Its recent output, or where to find it (None: none here). ``record`` is None for a name with
        no record (a deploy killed half-way, a job stopped by ``down``)."""
        ...

    def scrape_targets(
        self, settings: Settings, record: DeploymentRecord, deployed: bool
    ) -> dict[str | None, str | None] | None:
        """Its scrape targets: replica id (None: the deployment's one target) -> ``host:port`` (None:
        keep the last known). ``deployed``: right after a deploy (a cluster call allowed); else the
        exporter's refresh, which makes none. None: leave its file as it is."""
        ...
