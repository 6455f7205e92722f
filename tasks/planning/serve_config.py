"""Per-model Ray Serve settings: the `serve` settings, overridden by the model's own tags.

A tag ``nodewise.serve.<setting>`` on the registered model applies to all its versions; on a
model version, to that version (it wins). Example::

    MlflowClient().set_registered_model_tag("fraud", "nodewise.serve.max_replicas", "8")
"""

from __future__ import annotations

from pydantic import ValidationError

from nodewise.core.errors import InvalidServeOverride
from nodewise.core.settings import ServeSettings
from tasks.planning.registry import ResolvedModel

PREFIX = "nodewise.serve."
OVERRIDABLE = (
    "replicas",
    "min_replicas",
    "max_replicas",
    "target_ongoing_requests",
    "upscale_delay_s",
    "downscale_delay_s",
    "look_back_period_s",
    "max_ongoing_requests",
    "max_batch_size",
    "batch_wait_timeout_s",
    "max_request_bytes",
    "max_error_rate",
    "memory_limit_bytes",
)


def serve_settings_for(model: ResolvedModel, base: ServeSettings) -> ServeSettings:
    """``base`` with the model's ``nodewise.serve.*`` tags applied (version tags win)."""
    found: dict[str, tuple[str, str, str]] = {}  # setting -> (where, tag, raw value)
    for where, tags in (("registered model", model.model_tags), ("model version", model.tags)):
        for tag, raw in sorted(tags.items()):
            if not tag.startswith(PREFIX):
                continue
            field = tag.removeprefix(PREFIX)
            if field not in OVERRIDABLE:
                raise InvalidServeOverride(
                    f"{where} tag {tag!r} of {model.pinned_uri} is not a setting nodewise knows; "
                    f"use one of {', '.join(PREFIX + f for f in OVERRIDABLE)}"
                )
            found[field] = (where, tag, raw)
    if not found:
        return base
    try:
        merged = ServeSettings.model_validate({**base.model_dump(), **{f: v[2] for f, v in found.items()}})
    except ValidationError as e:
        error = e.errors()[0]
        where, tag, raw = found.get(str(error["loc"][0]) if error["loc"] else "", ("", "", ""))
        what = f"{where} tag {tag}={raw!r}" if tag else f"the nodewise.serve.* tags of {model.pinned_uri}"
        raise InvalidServeOverride(f"{what}: {error['msg']}; fix or delete the tag in the MLflow registry") from e
    if merged.replicas is not None and "replicas" not in found and found.keys() & {"min_replicas", "max_replicas"}:
        # The model's own autoscaling bounds win over a fixed count set for every model.
        merged = merged.model_copy(update={"replicas": None})
    return merged
