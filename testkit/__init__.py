"""The harness tests and benchmarks share: one closed-loop load client, one Prefect event reader,
one view of Serve's replicas, one ``wait_until``, network-namespace hosts, the test models and
their registration, the fuzz suite. Not part of nodewise (not installed with it; no product module
imports it) and free of test modules: pyproject.toml's import-linter contracts hold both."""

from testkit.events import read_events, wait_for_events
from testkit.load import LoadClient, Outcome
from testkit.replicas import replica_state, running_replicas, serve_replicas
from testkit.wait import wait_until

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
