"""What tests share: one closed-loop load client, one Prefect event reader, one view of Serve's
replicas, one ``wait_until``. Benchmarks import no test module: the few that still import from
here are listed, to move out, in pyproject.toml's contract "Benchmarks import no test module"."""

from tests.support.events import read_events, wait_for_events
from tests.support.load import LoadClient, Outcome
from tests.support.replicas import replica_state, running_replicas, serve_replicas
from tests.support.wait import wait_until

__all__ = [
    "LoadClient",
    "Outcome",
    "read_events",
    "replica_state",
    "running_replicas",
    "serve_replicas",
    "wait_for_events",
    "wait_until",
]
