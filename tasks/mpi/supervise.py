"""mpirun's supervisor: runs it, records how it ended, and says so at once.

``python -m tasks.mpi.supervise FOLDER [--events URL] -- MPIRUN ARGS...`` leads the job's
session (so stopping the session stops it, mpirun and every local rank). When mpirun exits by
itself (a rank or a host died), it writes ``FOLDER/exit.json`` (status and time) and posts a
``nodewise.cluster.exited`` event to the Prefect API at URL, whose trigger in prefect.yaml runs
the watchdog at once instead of at its next scheduled pass. Stopped by a signal (a stop, a
restart), it records the stop and posts nothing. Kept light: no Prefect import (~3 s), an HTTP
POST of the event (``POST /api/events``, Prefect's own route).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

EXIT_FILE = "exit.json"
EXITED_EVENT = "nodewise.cluster.exited"


def exited_event(app_name: str, code: int, hosts: list[str], now: datetime) -> dict[str, object]:
    """The event a dead job posts (its resource is the deployment's, as the watchdog's events are)."""
    return {
        "id": str(uuid.uuid4()),
        "occurred": now.isoformat(),
        "event": EXITED_EVENT,
        "resource": {"prefect.resource.id": f"nodewise.deployment.{app_name}", "prefect.resource.name": app_name},
        "payload": {"app": app_name, "status": code, "hosts": hosts, "at": now.isoformat(timespec="milliseconds")},
    }


def post_event(url: str, event: dict[str, object], timeout_s: float = 5.0) -> str | None:
    """POST one event to a Prefect API; returns why it failed, None when it was taken."""
    import httpx

    headers = {}
    auth = os.environ.get("PREFECT_API_AUTH_STRING")
    if auth:
        import base64

        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    try:
        response = httpx.post(f"{url.rstrip('/')}/events", json=[event], headers=headers, timeout=timeout_s)
    except httpx.HTTPError as e:
        return f"{type(e).__name__}: {e}"
    return None if response.status_code < 300 else f"HTTP {response.status_code}: {response.text[:200]}"


def main(argv: list[str]) -> int:
    if "--" not in argv or not argv[0:1]:
        print("usage: python -m tasks.mpi.supervise FOLDER [--events URL] -- MPIRUN ARGS...", file=sys.stderr)
        return 2
    split = argv.index("--")
    own, cmd = argv[:split], argv[split + 1 :]
    folder = Path(own[0])
    events = own[own.index("--events") + 1] if "--events" in own else None
    stopping = False
    child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)  # same session: a stop reaches both

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        if child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = child.wait()
    now = datetime.now(UTC)
    record = {"status": code, "at": now.isoformat(timespec="milliseconds"), "stopped": stopping, "t": time.time()}
    (folder / EXIT_FILE).write_text(json.dumps(record))
    if not stopping and events:
        cluster = json.loads((folder / "cluster.json").read_text()) if (folder / "cluster.json").exists() else {}
        app = cluster.get("app_name", folder.name)
        failed = post_event(events, exited_event(app, code, cluster.get("hosts", []), now))
        print(
            f"nodewise: mpirun exited with status {code}; "
            + (f"event {EXITED_EVENT} not posted ({failed})" if failed else f"posted {EXITED_EVENT}"),
            flush=True,
        )
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
