"""``nodewise render``: a registered model's Kubernetes manifests, planned against an inventory,
written for ``kubectl apply -f DIR`` (and applied through the API with ``--apply``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from nodewise.core.errors import DoesNotFit, NodewiseError
from nodewise.core.settings import Settings
from tasks.k8s.render import MultiNode, render
from tasks.planning.placement import PlacementPlan, plan_placement
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
        from tasks.k8s.watch import workload

        main = workload(self.objects)
        service = next(o for o in self.objects if o["kind"] == "Service")
        meta, port = service["metadata"], service["spec"]["ports"][0]["port"]
        return DeploymentRecord(
            app_name=f"{main['metadata']['namespace']}/{main['metadata']['name']}",
            model_name=self.model_name,
            model_version=self.model_version,
            model_uri=self.model_uri,
            backend=f"k8s-{main['kind'].lower()}",
            endpoint=f"http://{meta['name']}.{meta['namespace']}.svc:{port}",
            replicas=self.plan.replicas or 1,
            plan=self.plan.explain(),
            spec={"objects": self.objects},
        )


def manifests_for(model_uri: str, inventory: str, settings: Settings, multi_node: MultiNode | None = None) -> Rendered:
    """Resolve, profile and plan ``model_uri`` on ``inventory``; render."""
    from tasks.mpi.deploy import build_deepspeed_spec
    from tasks.planning.inventory_sources import read_inventory
    from tasks.planning.profile_models import profile_with_cache
    from tasks.planning.registry import make_client, resolve_model
    from tasks.planning.serve_config import serve_settings_for
    from tasks.rayserve.apps import build_spec

    model = resolve_model(model_uri, make_client(settings.tracking_uri, settings.registry_uri))
    serve = serve_settings_for(model, settings.serve)
    nodes = read_inventory(inventory, settings.ray.num_cpus).require_nodes()
    profile = profile_with_cache(model, batch_size=serve.max_batch_size, device=nodes.device_class)
    plan = plan_placement(
        profile,
        nodes,
        headroom_fraction=settings.placement.headroom_fraction,
        desired_replicas=serve.min_replicas or serve.replicas,
    )
    if not plan.fits:
        raise DoesNotFit(f"{model.pinned_uri} was not rendered: {plan.explain()}")
    if plan.backend == "deepspeed_mpi":
        spec: Any = build_deepspeed_spec(model, plan, settings)
    else:
        spec = build_spec(model, plan, settings, serve)
    warnings = []
    if settings.tracking_uri.startswith(("sqlite:", "file:", "/")) or "127.0.0.1" in settings.tracking_uri:
        warnings.append(
            f"the tracking URI {settings.tracking_uri} is local to this machine and pods cannot read it: "
            "set NODEWISE_MLFLOW__TRACKING_URI to an MLflow server the cluster reaches, and render again"
        )
    objects = render(spec, plan, settings.kubernetes, multi_node or settings.kubernetes.multi_node)
    return Rendered(
        objects=objects,
        plan=plan,
        warnings=warnings,
        model_uri=model.pinned_uri,
        model_name=model.name,
        model_version=model.version,
    )


def apply_rendered(model_uri: str, inventory: str, settings: Settings) -> str:
    """Render, apply through the API, record for the watchdog, wait until ready; the endpoint."""
    from tasks.k8s.apply import api_client, apply, wait_ready
    from tasks.records import save_record

    rendered = manifests_for(model_uri, inventory, settings)
    api = api_client()
    apply(rendered.objects, api)
    record = save_record(settings.k8s_records_path, rendered.record())
    wait_ready(rendered.objects, api, settings.serve.ready_timeout_s)
    return record.endpoint


def write_manifests(objects: list[dict[str, Any]], out: Path) -> list[Path]:
    """One YAML file per object, numbered in apply order (``kubectl apply -f DIR`` takes them in order)."""
    if out.exists() and not out.is_dir():
        raise NodewiseError(f"--out {out} is a file; give a folder (it is created if missing)")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("[0-9][0-9]-*.yaml"):  # a previous render of ours: replaced, not mixed
        stale.unlink()
    paths = []
    for index, manifest in enumerate(objects):
        path = out / f"{index:02d}-{manifest['kind'].lower()}-{manifest['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(manifest, sort_keys=False))
        paths.append(path)
    return paths
