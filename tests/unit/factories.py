"""Plain objects the unit tests build often."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Any

from tasks.planning.registry import ResolvedModel


def resolved_model(**fields: object) -> ResolvedModel:
    """A registered model version as resolve_model returns it (no registry needed)."""
    values: dict = {
        "name": "m",
        "version": "1",
        "alias": None,
        "pinned_uri": "models:/m/1",
        "artifact_uri": "file:///nowhere",
        "run_id": None,
        "flavors": ["python_function"],
        "flavor": "python_function",
        "artifact_bytes": 1,
    }
    return ResolvedModel(**{**values, **fields})


def streamed(request: Any, events: Iterable[Any], decode: Any) -> list[str]:
    """The Server-Sent Events ``openai_api.stream`` makes of ``events``, as lines of text."""
    from serving import openai_api

    async def source() -> AsyncIterator[Any]:
        for event in events:
            yield event

    async def lines() -> list[str]:
        return [chunk.decode() async for chunk in openai_api.stream(request, source(), decode)]

    return asyncio.run(lines())
