"""``nodewise render``: a registered model's Kubernetes manifests, planned against an inventory,
written for ``kubectl apply -f DIR`` (and applied through the API with ``--apply``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from nodewise.core.errors import DoesNotFit, InvalidInput
from nodewise.core.settings import Settings
from tasks.k8s.render import MultiNode, render
from tasks.planning.placement import DEEPSPEED_MPI, PlacementPlan
from tasks.records import DeploymentRecord


class Rendered(BaseModel):
    """A model's manifests and what they came from."""

    objects: list[dict[str, Any]]
    plan: PlacementPlan
    warnings: list[str]
    model_uri: str
    model_name: str
    model_version: str

    def record(self) -> DeploymentRecord:
        """What the watchdog keeps of it once applied (tasks/k8s/watch.py)."""
        from tasks.k8s.backend import backend_name
        from tasks.k8s.render import endpoint_name
        from tasks.k8s.watch import workload

        main = workload(self.objects)
        users = endpoint_name(main["metadata"]["name"])  # the front's, where there is one; not rank 0's
        service = next(o for o in self.objects if o["kind"] == "Service" and o["metadata"]["name"] == users)
        meta, port = service["metadata"], service["spec"]["ports"][0]["port"]
        return DeploymentRecord(
            app_name=f"{main['metadata']['namespace']}/{main['metadata']['name']}",
            model_name=self.model_name,
            model_version=self.model_version,
            model_uri=self.model_uri,
            backend=backend_name(main["kind"]),
            endpoint=f"http://{meta['name']}.{meta['namespace']}.svc:{port}",
            replicas=self.plan.replicas or 1,
            plan=self.plan.explain(),
            spec={"objects": self.objects},
        )


_LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "0.0.0.0", "")
_ALLOW_LOCAL = "or pass --allow-local for a cluster on this machine (kind, minikube)"


def local_location(uri: str) -> bool:
    """Whether ``uri`` names something only this machine can read: a file, SQLite, or a server on
    loopback. ``mlflow-artifacts:``, ``s3://``, ``gs://`` and remote servers are not local."""
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.scheme in ("", "file", "sqlite"):
        return True
    if parts.scheme in ("http", "https") or "+" in parts.scheme or parts.scheme in ("postgresql", "mysql", "mssql"):
        return (parts.hostname or "") in _LOCAL_HOSTS
    return False


def refuse_local_tracking(settings: Settings) -> None:
    """Pods cannot read this machine's registry: refuse before any work, naming the fix."""
    from serving.spec import redact_uri

    if local_location(settings.tracking_uri):
        raise InvalidInput(
            f"the tracking URI {redact_uri(settings.tracking_uri)} is local to this machine and pods cannot "
            "read it: set NODEWISE_MLFLOW__TRACKING_URI to an MLflow server the cluster reaches, " + _ALLOW_LOCAL
        )


def refuse_local_artifacts(artifact_uri: str, model: str) -> None:
    """The model's files must be where pods read them (the server's mlflow-artifacts:, S3, GCS)."""
    if local_location(artifact_uri):
        raise InvalidInput(
            f"{model}'s artifacts are at {artifact_uri}, on this machine's disk, and pods cannot read them: "
            "log models to an artifact store the cluster reaches (`mlflow server --serve-artifacts`, "
            "whose mlflow-artifacts: URIs go through the server, or S3/GCS), " + _ALLOW_LOCAL
        )


SECRET_VARIABLES = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME")


def require_secret_reference(settings: Settings) -> None:
    """A password (in the tracking URI, or MLflow's credential variables here) reaches pods only
    through a Kubernetes Secret they reference: refuse to render without one."""
    from serving.spec import redact_uri

    if settings.kubernetes.credentials_secret:
        return
    has_password = any(redact_uri(u) != u for u in (settings.tracking_uri, settings.registry_uri))
    variables = [v for v in SECRET_VARIABLES if os.environ.get(v)]
    if has_password or variables:
        what = "the tracking URI carries a password" if has_password else f"{', '.join(variables)} is set"
        raise InvalidInput(
            f"{what}, which nodewise never writes into a manifest: put the credentials in a Secret "
            f"(kubectl -n {settings.kubernetes.namespace} create secret generic nodewise-mlflow "
            "--from-literal=MLFLOW_TRACKING_URI=...) and set NODEWISE_KUBERNETES__CREDENTIALS_SECRET=nodewise-mlflow"
        )


def manifests_for(
    model_uri: str,
    inventory: str,
    settings: Settings,
    multi_node: MultiNode | None = None,
    allow_local: bool = False,
) -> Rendered:
    """Plan ``model_uri`` on ``inventory`` (the one planning path); render. Refuses a tracking URI
    or artifact store only this machine reaches, unless ``allow_local`` (then it warns)."""
    from tasks.mpi.deploy import build_deepspeed_spec
    from tasks.planning.plan import plan_model
    from tasks.rayserve.apps import build_spec

    allow_local = allow_local or settings.kubernetes.allow_local
    if not allow_local:
        refuse_local_tracking(settings)
    require_secret_reference(settings)
    planned = plan_model(model_uri, inventory, settings)
    model, plan = planned.model, planned.plan
    if model is None:  # plan_model of a models:/ URI always resolves one
        raise InvalidInput(f"{model_uri!r} is not a registered model; render takes models:/NAME@ALIAS or /VERSION")
    if not allow_local:
        refuse_local_artifacts(model.artifact_uri, model.pinned_uri)
    if not plan.fits:
        raise DoesNotFit(f"{model.pinned_uri} was not rendered: {plan.explain()}")
    if plan.backend == DEEPSPEED_MPI:
        # Rank 0 has a pod of its own, apart from the front's: deepspeed.rank0_port where set, else
        # the deployment's port (not a free port of this machine, as a local front's rank 0 gets).
        ds = settings.deepspeed
        port = (ds.rank0_port or ds.port) if ds.front else ds.port
        spec: Any = build_deepspeed_spec(model, plan, settings).model_copy(update={"port": port})
    else:
        spec = build_spec(model, plan, settings, planned.serve)
    warnings = []
    if local_location(settings.tracking_uri) or local_location(model.artifact_uri):
        from serving.spec import redact_uri

        warnings.append(
            f"--allow-local: the tracking URI {redact_uri(settings.tracking_uri)} or the artifacts at "
            f"{model.artifact_uri} are on this machine; only pods on this machine can read them"
        )
    objects = render(spec, plan, settings.kubernetes, multi_node or settings.kubernetes.multi_node, settings.deepspeed)
    return Rendered(
        objects=objects,
        plan=plan,
        warnings=warnings,
        model_uri=model.pinned_uri,
        model_name=model.name,
        model_version=model.version,
    )


def apply_rendered(
    rendered: Rendered, settings: Settings, timeout_s: float | None = None, say: Callable[[str], object] = print
) -> DeploymentRecord:
    """Apply ``rendered`` through the API, record it for the watchdog, wait until it is ready.

    One path for ``render --apply`` and the promotion flow's ``target=kubernetes``: ``say`` gets a
    line per object applied; ``timeout_s`` defaults to ``kubernetes.ready_timeout_s``.
    """
    from tasks.k8s.apply import apply, wait_ready
    from tasks.kubeapi import api_client
    from tasks.records import save_record

    api = api_client()
    for line in apply(rendered.objects, api):
        say(line)
    record = save_record(settings.state.k8s_records, rendered.record())  # applied: watched from now on
    wait_ready(rendered.objects, api, timeout_s or settings.kubernetes.ready_timeout_s)
    return record


def delete_rendered(rendered: Rendered, settings: Settings) -> list[str]:
    """Delete ``rendered``'s objects through the API and stop watching them."""
    from tasks.k8s.apply import delete
    from tasks.kubeapi import api_client
    from tasks.records import remove_record

    done = delete(rendered.objects, api_client())
    remove_record(settings.state.k8s_records, rendered.record().app_name)
    return done


def write_manifests(objects: list[dict[str, Any]], out: Path) -> list[Path]:
    """One YAML file per object, numbered in apply order (``kubectl apply -f DIR`` takes them in order)."""
    if out.exists() and not out.is_dir():
        raise InvalidInput(f"--out {out} is a file; give a folder (it is created if missing)")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("[0-9][0-9]-*.yaml"):  # a previous render of ours: replaced, not mixed
        stale.unlink()
    paths = []
    for index, manifest in enumerate(objects):
        path = out / f"{index:02d}-{manifest['kind'].lower()}-{manifest['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(manifest, sort_keys=False))
        paths.append(path)
    return paths
