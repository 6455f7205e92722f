"""Per-model settings from registry tags: the `serve` settings (here), the `rollout` settings
(tasks/rollout/), each overridden by the model's own tags (``settings_from_tags``).

A tag ``nodewise.serve.<setting>`` on the registered model applies to all its versions; on a
model version, to that version (it wins). Example::

    MlflowClient().set_registered_model_tag("fraud", "nodewise.serve.max_replicas", "8")
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ValidationError

from nodewise.core.errors import InvalidServeOverride
from nodewise.core.settings import ServeSettings
from tasks.planning.registry import ResolvedModel

Section = TypeVar("Section", bound=BaseModel)

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
    merged, found = settings_from_tags(model, PREFIX, base, OVERRIDABLE)
    if merged.replicas is not None and "replicas" not in found and found & {"min_replicas", "max_replicas"}:
        # The model's own autoscaling bounds win over a fixed count set for every model.
        merged = merged.model_copy(update={"replicas": None})
    return merged


def settings_from_tags(
    model: ResolvedModel,
    prefix: str,
    base: Section,
    overridable: tuple[str, ...],
    ignore: frozenset[str] = frozenset(),
) -> tuple[Section, set[str]]:
    """``base`` (a settings section) with the model's ``<prefix><field>`` tags applied (those of its
    version win over the registered model's), and the fields they set (tags named in ``ignore`` are
    nodewise's own records under that prefix). A tag nodewise does not
    know, or a value its field refuses, is InvalidServeOverride naming the tag and the fix."""
    found: dict[str, tuple[str, str, str]] = {}  # setting -> (where, tag, raw value)
    for where, tags in (("registered model", model.model_tags), ("model version", model.tags)):
        for tag, raw in sorted(tags.items()):
            if not tag.startswith(prefix):
                continue
            field = tag.removeprefix(prefix)
            if field in ignore:  # nodewise's own record under the same prefix
                continue
            if field not in overridable:
                raise InvalidServeOverride(
                    f"{where} tag {tag!r} of {model.pinned_uri} is not a setting nodewise knows; "
                    f"use one of {', '.join(prefix + f for f in overridable)}"
                )
            found[field] = (where, tag, raw)
    if not found:
        return base, set()
    try:
        merged = type(base).model_validate({**base.model_dump(), **{f: v[2] for f, v in found.items()}})
    except ValidationError as e:
        error = e.errors()[0]
        where, tag, raw = found.get(str(error["loc"][0]) if error["loc"] else "", ("", "", ""))
        what = f"{where} tag {tag}={raw!r}" if tag else f"the {prefix}* tags of {model.pinned_uri}"
        raise InvalidServeOverride(f"{what}: {error['msg']}; fix or delete the tag in the MLflow registry") from e
    return merged, set(found)
