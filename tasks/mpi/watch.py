"""The watchdog's DeepSpeed half: a group checked through mpirun, rank 0's ``/health`` and a canary.

A job is sick when mpirun exited (a rank died, so mpirun stopped them all), rank 0 says a rank is
not ready (every rank's heartbeat and step), or a canary inference misses its deadline. A sick
job is restarted whole (every rank stopped, all relaunched with a fresh rendezvous port, a host
that is down replaced by a spare, then waited for), because the survivors of a lost rank cannot
go on alone. Budgets and events are the engine's (tasks/watchdog/engine.py), through ``WatchPass``.
"""

from __future__ import annotations

import time

from nodewise.core.errors import DeployFailed, NodewiseError, NotEnoughHosts
from nodewise.core.settings import Settings
from tasks.backend import Action, WatchPass
from tasks.records import DeploymentRecord

CANARY_IDS = [[0, 1, 2, 3]]  # valid token ids for any vocabulary


def check_deepspeed(settings: Settings, record: DeploymentRecord) -> str | None:
    """Why the DeepSpeed job is sick, or None when every rank is ready and a canary answers in time."""
    import httpx

    from tasks.mpi.health import exit_code, health, worker_error
    from tasks.mpi.records import read_cluster

    cluster = read_cluster(settings, record.app_name)
    if cluster is None:
        return "no job is running (stopped, or a restart was interrupted)"
    code = exit_code(cluster)
    if code is not None:
        return f"mpirun exited (status {code}): " + (worker_error(cluster) or "a rank died, so mpirun stopped them all")
    timeout = settings.watchdog.canary_timeout_s
    state = health(cluster, timeout_s=timeout)
    if not state.get("ready"):
        return "; ".join(state.get("problems", [])) or "rank 0 says not ready"
    try:
        response = httpx.post(f"{cluster.endpoint}/invocations", json={"inputs": CANARY_IDS}, timeout=timeout)
    except httpx.TimeoutException:
        return f"canary inference took over {timeout:.0f} s"
    except httpx.HTTPError as e:
        return f"canary inference failed: {type(e).__name__}"
    if response.status_code != 200:
        return f"canary inference answered HTTP {response.status_code}: {response.text[:200]}"
    return None


def restart_deepspeed(settings: Settings, record: DeploymentRecord) -> tuple[float, list[str]]:
    """Stop every rank, relaunch all with a fresh rendezvous port (a host that is down replaced by a
    spare), wait until every rank is ready. Returns the seconds it took and the hosts it runs on.

    The front (when there is one) reads rank 0's address from the new group's record, wherever
    rank 0 now runs; its own record notes it too."""
    from tasks.mpi.front import follow
    from tasks.mpi.health import wait_ready
    from tasks.mpi.launcher import relaunch

    started = time.monotonic()
    cluster = relaunch(settings, record.app_name, record.deepspeed_spec())
    wait_ready(cluster, settings.deepspeed.ready_timeout_s)
    follow(settings, record.app_name, cluster.endpoint)
    return time.monotonic() - started, cluster.hosts


def watch_group(settings: Settings, record: DeploymentRecord, this: WatchPass) -> list[Action]:
    """One check of ``record``'s group (a sick one restarted whole within the budget), then what
    its front held, repeated and continued since the last pass (``nodewise.front.held``)."""
    return _check_group(settings, record, this) + front_held(settings, record, this)


def front_held(settings: Settings, record: DeploymentRecord, this: WatchPass) -> list[Action]:
    """The growth of the front's counts since the last pass, as one action (tasks/mpi/front_counts.py)."""
    from tasks.mpi.front_counts import front_report

    this.watch.front, fields = front_report(settings, record.app_name, this.watch.front)
    return [this.action("nodewise.front.held", **fields)] if fields else []


def _check_group(settings: Settings, record: DeploymentRecord, this: WatchPass) -> list[Action]:
    from tasks.mpi.hosts import choose_hosts, clean_leftovers
    from tasks.mpi.launcher import stop_cluster
    from tasks.mpi.records import read_cluster, read_placement

    watch = this.watch
    clean_leftovers(settings, record.app_name)  # ranks a partition kept out of reach of the last stop
    cause = check_deepspeed(settings, record) if watch.pending is None else f"finishing an interrupted {watch.pending}"
    if cause is None:
        return this.degraded(None)
    running = read_cluster(settings, record.app_name)
    try:
        placement = read_placement(settings, record.app_name)
        choose_hosts(placement, settings)
    except NotEnoughHosts as e:
        stop_cluster(settings, record.app_name)  # the survivors cannot go on alone; relaunched when hosts return
        done = this.degraded(str(e))
        for a in done:
            a.outcome = "; ".join(e.down.values())  # why each host is down (the cause stays the same per pass)
        return done
    except NodewiseError as e:
        return this.degraded(str(e))
    before = running.hosts if running is not None else placement.hosts
    after: list[str] = []

    def restart() -> tuple[float, str]:
        try:
            took, hosts = restart_deepspeed(settings, record)
            after.extend(hosts)
            return took, "every rank ready"
        except (DeployFailed, NodewiseError) as e:
            stop_cluster(settings, record.app_name)  # no half-started ranks left behind
            return 0.0, f"restart failed: {e}"

    done = this.budgeted("nodewise.cluster.restarted", cause, "all ranks", restart)
    if done.event == "nodewise.cluster.restarted":
        done.hosts_before, done.hosts_after = before, after or None
    return [done]
