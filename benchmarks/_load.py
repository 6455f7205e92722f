"""Closed-loop HTTP load with wrk (Debian package `wrk`): requests/s, p50, p99, failures."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open("{body}", "rb")
wrk.body = f:read("*a")
f:close()
"""


def wrk_args(connections: int, seconds: int) -> list[str]:
    return [require_wrk(), "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", "--latency"]


def require_wrk() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise SystemExit("error: wrk is not installed; install it with `apt-get install wrk` (Debian/Ubuntu)")
    return path


def wait_ready(url: str, body: bytes, timeout_s: float = 300.0) -> None:
    """Until ``url`` answers a scoring request with 200."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            r = httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=10)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as e:
            last = str(e)
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout_s:.0f} s: {last}")


def _ms(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def run_wrk(url: str, body: bytes, connections: int, seconds: int) -> dict[str, float | int]:
    """One closed-loop run: ``connections`` clients, each sending the next request on an answer."""
    with start_wrk(url, body, connections, seconds) as proc:
        out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed (exit {proc.returncode}): {out[-500:]}")
    return parse_wrk(out)


@contextlib.contextmanager
def start_wrk(url: str, body: bytes, connections: int, seconds: int) -> Iterator[subprocess.Popen]:
    """wrk running in the background (read its report with ``communicate()``)."""
    with tempfile.TemporaryDirectory() as tmp:
        body_path = Path(tmp) / "body.json"
        body_path.write_bytes(body)
        script = Path(tmp) / "post.lua"
        script.write_text(_LUA.format(body=body_path))
        proc = subprocess.Popen(
            [*wrk_args(connections, seconds), "-s", str(script), url],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def parse_wrk(out: str) -> dict[str, float | int]:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, flags=re.M))
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    failed = (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, errors.groups())) if errors else 0)
    return {
        "rps": round(rps, 1),
        "p50_ms": round(_ms(lat["50"]), 1),
        "p99_ms": round(_ms(lat["99"]), 1),
        "requests": total,
        "failed": failed,
    }
