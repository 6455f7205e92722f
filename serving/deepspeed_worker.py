"""One rank of a DeepSpeed tensor-parallel cluster: ``python -m serving.deepspeed_worker SPEC.json``.

Every rank derives its distributed environment from its launcher (``serving.dist_env``), loads
the model and takes its shard. Rank 0 also answers HTTP (the MLflow scoring protocol on
``POST /invocations``, ``POST /generate`` for causal LMs, ``GET /ping``, ``/health``, ``/version``):
it validates each request, broadcasts it, every rank computes, and rank 0 replies. Idle ranks
step together every ``tick_s`` seconds; each rank posts a heartbeat (state, step count, time
since its last step) to rank 0 every ``heartbeat_s``, so a dead rank (no heartbeat) and a hung
one (no step) are both seen. ``/ping`` is 200 only when every rank is ready and alive.

A rank that cannot start prints one line ``nodewise-worker error: ...`` and exits 1; the
launcher reports that line.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from serving.dist_env import DistEnv, DistEnvError, discover, network_exports, rendezvous_url, route_source
from serving.rank0_frontend import Frontend
from serving.rank_health import ClusterView, RankState, heartbeats
from serving.spec import ERROR_MARK, SPEC_ENV, DeepSpeedSpec
from serving.step_loop import _engine_step, _plan, _run, _step_loop

# what other modules (the tests) import from here
__all__ = ["ClusterView", "Frontend", "RankState", "_engine_step", "_plan", "_run", "main"]


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2) or (len(argv) == 2 and not argv[1].startswith("--launch=")):
        # --launch=ID names one launch of the job in every rank's command line (for its cleanup)
        print(f"{ERROR_MARK} usage: python -m serving.deepspeed_worker SPEC.json [--launch=ID]", file=sys.stderr)
        return 2
    try:
        # The launcher passes the spec in the environment (other hosts lack its state folder); the
        # path also names the job in every rank's command line (how a stop finds them on any host).
        spec = DeepSpeedSpec.model_validate_json(os.environ.get(SPEC_ENV) or Path(argv[0]).read_text())
        env = discover(os.environ)
        if env.world_size != spec.tp_size:
            raise DistEnvError(
                f"the launcher started {env.world_size} ranks but the spec asks for tp_size={spec.tp_size}; "
                f"start {spec.tp_size} ranks (mpirun -np {spec.tp_size})"
            )
        network = network_exports(env, os.environ)
    except (OSError, ValueError) as e:
        print(f"{ERROR_MARK} {e}", file=sys.stderr, flush=True)
        return 2
    os.environ.update({**env.exports(), **network})
    state = RankState(env.rank, route_source(env.master_addr) or "?")
    view = ClusterView(spec, env.world_size) if env.rank == 0 else None
    frontend = Frontend(spec, view) if view is not None else None
    if frontend is not None:
        from serving.http_server import HttpServer
        from serving.rank0_http import Rank0App

        try:
            server = HttpServer(Rank0App(frontend), spec.host, spec.port)
        except OSError as e:
            print(
                f"{ERROR_MARK} rank 0 cannot listen on {spec.host}:{spec.port} ({e.strerror}); pick a free port "
                "(NODEWISE_DEEPSPEED__PORT)",
                file=sys.stderr,
                flush=True,
            )
            return 1
        server.start_in_thread()  # uvicorn on its own thread and event loop; the step loop runs on this one
    url = f"http://{_url_host(env.master_addr)}:{spec.port}/internal/heartbeat"
    threading.Thread(target=heartbeats, args=(state, url, spec.heartbeat_s, view), daemon=True).start()
    try:
        model = _start(env, spec, state, Path(argv[0]).resolve().parent)
    except Exception as e:
        state.error = f"{type(e).__name__}: {e}"
        state.enter("failed")
        print(f"{ERROR_MARK} rank {env.rank}: {e}", file=sys.stderr, flush=True)
        time.sleep(spec.heartbeat_s * 1.5)  # let rank 0 see why
        return 1
    if frontend is not None:
        frontend.model = model
    state.enter("ready")
    took = ", ".join(f"{k} {v:.1f} s" for k, v in state.phases.items())
    print(
        f"rank {env.rank}/{env.world_size} ready ({env.launcher}, master {env.master_addr}:{env.master_port}; {took})"
    )
    sys.stdout.flush()
    _step_loop(env, spec, model, state, frontend)
    return 0


def _start(env: DistEnv, spec: DeepSpeedSpec, state: RankState, folder: Path) -> Any:
    from datetime import timedelta

    state.enter("importing")

    import deepspeed
    import torch

    from serving._lm import LanguageModel

    state.enter("joining")
    if spec.device == "cuda":
        torch.cuda.set_device(env.local_rank)
    deepspeed.init_distributed(
        dist_backend="nccl" if spec.device == "cuda" else "gloo",
        auto_mpi_discovery=False,
        timeout=timedelta(seconds=spec.collective_timeout_s),
        init_method=rendezvous_url(env, folder),  # None: env://, torch's TCP store on MASTER_ADDR
        rank=env.rank,
        world_size=env.world_size,
    )
    if not env.all_local:
        # DeepSpeed's shared-memory all-reduce assumes every rank on one host and has no fallback
        # (its kernel runs on buffers only a one-host job sets up): ranks on several hosts all-reduce
        # through gloo over TCP instead.
        from deepspeed.comm import comm as ds_comm

        if getattr(ds_comm, "cdb", None) is not None:
            ds_comm.cdb.shm_vector_kernel_level = 0
    state.enter("loading")
    model = LanguageModel.load(spec)
    state.enter("sharding")
    model.shard(env.world_size)
    return model


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
