"""Prefect events read back over the API (``POST /events/filter``): the same reader for the test
harness's server, a ``nodewise up`` server and a benchmark's. Events are stored asynchronously:
``wait_for_events`` polls."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx

from testkit.wait import wait_until


def default_api_url() -> str:
    """The Prefect API this process talks to (the test harness's, in tests)."""
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value())


def read_events(
    names: list[str] | None = None,
    resource: str | None = None,
    any_resource: str | None = None,
    since: float | None = None,
    api_url: str | None = None,
) -> list[dict]:
    """Events (JSON, newest first, every page) named ``names``, about ``resource`` (the main
    resource's id) or ``any_resource`` (any related resource's id), that occurred after ``since``
    (``time.time()``); all of them when no filter is given."""
    api_url = api_url or default_api_url()
    wanted: dict = {}
    if names:
        wanted["event"] = {"name": names}
    if resource:
        wanted["resource"] = {"id": [resource]}
    if any_resource:
        wanted["any_resource"] = {"id": [any_resource]}
    if since is not None:
        wanted["occurred"] = {"since": datetime.fromtimestamp(since, UTC).isoformat()}
    # A fresh filter each call: the server's default window ends when the request is read.
    answer = httpx.post(f"{api_url}/events/filter", json={"filter": wanted, "limit": 50}, timeout=30)
    answer.raise_for_status()
    page = answer.json()
    events = list(page["events"])
    while page.get("next_page"):  # the server gives at most 50 a page
        page = httpx.get(page["next_page"], timeout=30).json()
        events.extend(page["events"])
    return events


def wait_for_events(
    names: list[str] | None = None,
    resource: str | None = None,
    any_resource: str | None = None,
    since: float | None = None,
    at_least: int = 1,
    timeout_s: float = 30.0,
    api_url: str | None = None,
) -> list[dict]:
    """``read_events`` until at least ``at_least`` match; AssertionError after ``timeout_s``."""
    found: list[dict] = []

    def enough() -> bool:
        found[:] = read_events(names, resource, any_resource, since, api_url)
        return len(found) >= at_least

    wait_until(
        enough, timeout_s, f"{at_least} event(s) {names or ''} of {resource or any_resource or 'any resource'}",
        seen=lambda: [e["event"] for e in found],
    )  # fmt: skip
    return found
