"""Strict offline validation of Kubernetes manifests, as an API server with strict field
validation would do: custom kinds against the official CRDs (tests/fixtures/crds, with unknown
fields rejected), core kinds against the Kubernetes schemas (kubernetes-validate, strict)."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import yaml

CRDS = Path(__file__).parent / "fixtures" / "crds"
CORE_VERSION = "1.31"


def _strict(schema: Any) -> Any:
    """``additionalProperties: false`` on every object schema with properties that does not
    preserve unknown fields (what the API server's strict field validation enforces)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> strict openAPIV3Schema, from every CRD file."""
    found = {}
    for path in CRDS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            found[(f"{group}/{version['name']}", kind)] = _strict(version["schema"]["openAPIV3Schema"])
    return found


def validate(manifest: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` (or kubernetes-validate's) naming the first problem."""
    import jsonschema
    import kubernetes_validate

    key = (manifest.get("apiVersion", ""), manifest.get("kind", ""))
    schema = crd_schemas().get(key)
    if schema is not None:
        # The CRD schema does not cover apiVersion/kind/metadata strictly: check metadata as ObjectMeta.
        body = copy.deepcopy(manifest)
        jsonschema.validate(body, schema)
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": body["metadata"]}, CORE_VERSION, strict=True
        )
        return
    kubernetes_validate.validate(manifest, CORE_VERSION, strict=True)
