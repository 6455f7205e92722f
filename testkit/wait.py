"""Polling with a deadline: the one way tests wait for something to become true."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    check: Callable[[], T],
    timeout_s: float,
    what: str = "the condition",
    every_s: float = 0.5,
    seen: Callable[[], object] | None = None,
) -> T:
    """Call ``check`` every ``every_s`` seconds until it returns something truthy, and return that.

    Raises AssertionError after ``timeout_s`` seconds, naming ``what`` and, when given, ``seen()``
    (what was observed last), so a failed wait says why.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            detail = f"; last seen: {seen()!r}" if seen is not None else ""
            raise AssertionError(f"{what}: not true after {timeout_s:.0f} s{detail}")
        time.sleep(every_s)
