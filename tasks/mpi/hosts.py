"""The job's hosts: which can take ranks, and what a stop must clean beyond mpirun's own session.

``host_down`` / ``choose_hosts``: a host is up when the remote shell runs ``true`` on it; a
relaunch takes the current hosts that are up, then spares. ``stop_remote_ranks`` /
``clean_leftovers``: ranks left on other hosts are killed through the remote shell by their
launch's command line; hosts that do not answer are kept in ``leftovers.json`` and tried again.
``job_sessions``: the job's mpirun sessions on this machine, recorded or not.
``remove_rendezvous_files``: the file store a one-machine job's ranks met through.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
from pathlib import Path

from nodewise.core.errors import NotEnoughHosts
from nodewise.core.settings import Settings
from nodewise.core.state import write_json
from serving.dist_env import RENDEZVOUS_PREFIX, is_local_host
from tasks.mpi.records import LEFTOVERS, Placement, cluster_dir, read_leftovers


def host_down(host: str, settings: Settings) -> str | None:
    """Why ``host`` cannot take ranks now (the remote shell cannot run ``true`` on it), None if it can."""
    if is_local_host(host):
        return None
    ds = settings.deepspeed
    argv = [*shlex.split(ds.remote_shell), host, "true"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=ds.host_check_timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return f"{host} did not answer `{ds.remote_shell} {host} true` within {ds.host_check_timeout_s:.0f} s"
    except OSError as e:
        return f"remote shell {ds.remote_shell!r} cannot run ({e.strerror}); set NODEWISE_DEEPSPEED__REMOTE_SHELL"
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or [f"status {done.returncode}"])[-1][:200]
        return f"{host} is unreachable through {ds.remote_shell!r} ({why})"
    return None


def choose_hosts(placement: Placement, settings: Settings) -> tuple[list[str], dict[str, str]]:
    """The hosts a relaunch uses: the current ones that are up, then spares in order, as many as before.

    Returns them and why each skipped host is down. Raises ``NotEnoughHosts`` when too few are up.
    """
    wanted = len(placement.hosts)
    chosen: list[str] = []
    down: dict[str, str] = {}
    for host in [*placement.hosts, *placement.spares]:
        if len(chosen) == wanted:
            break
        why = host_down(host, settings)
        if why is None:
            chosen.append(host)
        else:
            down[host] = why
    if len(chosen) < wanted:
        raise NotEnoughHosts(
            f"not enough nodes: the job needs {wanted} host(s) and only {len(chosen)} of "
            f"{len(placement.hosts) + len(placement.spares)} answer (down: {', '.join(down)}); it is "
            "relaunched when one comes back, or add a spare node of the same kind to the inventory",
            down=down,
        )
    return chosen, down


def stop_remote_ranks(settings: Settings, launches: dict[str, str], spec_path: str) -> list[str]:
    """Kill ranks of the job's launches left on other hosts (``{host: launch id}``): mpirun killed
    hard, or a host cut off when it stopped.

    Through the remote shell, by the launch's command line (a later launch on the same host is
    spared); a host that does not answer is noted in ``leftovers.json`` and tried again at the
    next stop or watchdog pass (``clean_leftovers``).
    """
    folder = Path(spec_path).parent
    pending = read_leftovers(folder)
    pending.update({h: launch for h, launch in launches.items() if not is_local_host(h)})
    if not pending:
        return []
    ds = settings.deepspeed
    still: dict[str, str] = {}
    for host, launch in sorted(pending.items()):
        # "[s]erving": the pattern matches the ranks, not the shell that runs pkill with it
        pattern = f"[s]erving.deepspeed_worker {spec_path}" + (f" --launch={launch}" if launch else "")
        argv = [*shlex.split(ds.remote_shell), host, f"pkill -KILL -f -- {shlex.quote(pattern)}; true"]
        try:
            ok = subprocess.run(argv, capture_output=True, timeout=ds.host_check_timeout_s, check=False).returncode == 0
        except (subprocess.TimeoutExpired, OSError):
            ok = False
        if not ok:
            still[host] = launch
    if not still:
        (folder / LEFTOVERS).unlink(missing_ok=True)
        return []
    write_json(folder / LEFTOVERS, still)
    return [f"could not reach {', '.join(still)} to stop ranks left there; tried again at the next pass"]


def clean_leftovers(settings: Settings, app_name: str) -> list[str]:
    """Stop ranks an earlier stop could not reach (a host that was cut off and is back)."""
    folder = cluster_dir(settings, app_name)
    before = read_leftovers(folder)
    if not before:
        return []
    notes = stop_remote_ranks(settings, {}, str(folder / "spec.json"))
    cleaned = sorted(set(before) - set(read_leftovers(folder)))
    return [f"stopped ranks left on {', '.join(cleaned)}"] if cleaned else notes


def job_sessions(spec_path: Path) -> list[int]:
    """The mpirun sessions on this machine running the job of ``spec_path`` (each mpirun leads its own)."""
    import psutil

    marker = str(spec_path)
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error, OSError):
            if marker in (proc.info["cmdline"] or []) and os.getsid(proc.info["pid"]) == proc.info["pid"]:
                found.append(proc.info["pid"])
    return sorted(found)


def remove_rendezvous_files(folder: Path) -> None:
    """The file store the ranks of a one-machine job met through (serving/dist_env.py)."""
    for path in folder.glob(RENDEZVOUS_PREFIX + "*"):
        path.unlink(missing_ok=True)
