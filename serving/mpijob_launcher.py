"""An MPIJob launcher's entry point: tell every rank where rank 0 is, then run mpirun.

The MPI Operator mounts its hostfile (``OMPI_MCA_orte_default_hostfile``, one
``NAME-worker-I.NAME.NAMESPACE.svc slots=N`` line per worker) in the launcher pod only. mpirun
places ranks by slot in file order, so rank 0 runs on the first host; but the ranks, started over
ssh in the worker pods, cannot read that file. This reads it here and exports ``MASTER_ADDR``,
which the rendered command passes on with ``mpirun -x MASTER_ADDR``
(``serving.dist_env`` then takes it as given). Usage, as `nodewise render` writes it::

    python -m serving.mpijob_launcher mpirun -np 4 ... -x MASTER_ADDR python -m serving.deepspeed_worker SPEC

A missing or empty hostfile is one line on stderr and exit 2, before any rank starts.
"""

from __future__ import annotations

import os
import sys

from serving.dist_env import HOSTFILE_VARIABLES, DistEnvError, first_host


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m serving.mpijob_launcher mpirun ARGS...", file=sys.stderr)
        return 2
    environ = dict(os.environ)
    if not environ.get("MASTER_ADDR", "").strip():
        hostfile = next((environ[name] for name in HOSTFILE_VARIABLES if environ.get(name)), None)
        if hostfile is None:
            print(
                f"nodewise-launcher error: none of {', '.join(HOSTFILE_VARIABLES)} is set, so rank 0's host "
                "is unknown; run this in an MPIJob's launcher (the MPI Operator sets it) or set MASTER_ADDR",
                file=sys.stderr,
            )
            return 2
        try:
            environ["MASTER_ADDR"] = first_host(hostfile)
        except DistEnvError as e:
            print(f"nodewise-launcher error: {e}", file=sys.stderr)
            return 2
    print(f"nodewise-launcher: rank 0 on {environ['MASTER_ADDR']}", file=sys.stderr, flush=True)
    try:
        os.execvpe(argv[0], argv, environ)
    except OSError as e:
        print(f"nodewise-launcher error: cannot run {argv[0]} ({e.strerror}); is Open MPI installed?", file=sys.stderr)
        return 2
    return 0  # not reached: exec replaced this process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
