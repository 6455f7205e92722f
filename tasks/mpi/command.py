"""The mpirun command line of a DeepSpeed job, built from its arguments alone; runs nothing.

One rank per device, ``ranks_per_host`` on each host in host order; every rank runs
``python -m serving.deepspeed_worker SPEC.json --launch=ID`` (the launch id lets a cleanup of
this launch spare the next one). Ranks all on this machine oversubscribe its cores; for ranks
on other hosts mpirun starts its daemons through the remote shell.
"""

from __future__ import annotations

import os
from pathlib import Path

from serving.dist_env import is_local_host


def mpirun_command(
    mpirun: str,
    python: str,
    spec_path: Path,
    hosts: list[str],
    ranks_per_host: int,
    env_names: list[str],
    extra: list[str],
    remote_shell: str = "ssh",
    launch_id: str = "",
) -> list[str]:
    """The mpirun command line: one rank per device, ``ranks_per_host`` on each host, in host order."""
    local = all(is_local_host(h) for h in hosts)
    host_arg = f"localhost:{len(hosts) * ranks_per_host}" if local else ",".join(f"{h}:{ranks_per_host}" for h in hosts)
    cmd = [mpirun]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    cmd += ["-np", str(len(hosts) * ranks_per_host), "--host", host_arg, "--map-by", "slot", "--bind-to", "none"]
    if local:
        cmd.append("--oversubscribe")  # "nodes" of one machine: a core may hold several ranks
    else:
        cmd += ["--mca", "plm_rsh_agent", remote_shell]  # how mpirun starts its daemon on each host
        # Open MPI 4.1's daemon on another host maps hwloc's topology at "the biggest hole" of its
        # address space and now and then segfaults there (hwloc_shmem_topology_write, mpirun then
        # exits 139; seen in 1 of ~15 cross-host launches here). The ranks are not bound to cores
        # (--bind-to none), so they need no shared topology: skip it.
        cmd += ["--mca", "rtc_hwloc_vmhole", "none"]
    for name in env_names:
        cmd += ["-x", name]
    worker = [python, "-m", "serving.deepspeed_worker", str(spec_path)]
    return [*cmd, *extra, *worker, *([f"--launch={launch_id}"] if launch_id else [])]
