"""The step loop every rank runs: rank 0's plan broadcast, its work run, the engine stepped in lockstep.

Rank 0 builds each step's ``Plan`` (``serving.messages``) from what its HTTP side queued
(``Frontend.commands``); every rank receives it (one ``broadcast_object_list``), runs its piece of
work and the same engine step; rank 0's requests hear of theirs through their events.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from serving.dist_env import DistEnv
from serving.messages import (
    Add,
    Cancel,
    EndEvent,
    ErrorEvent,
    FinishReason,
    Forward,
    Generate,
    Plan,
    Tick,
    Work,
)
from serving.spec import DeepSpeedSpec

if TYPE_CHECKING:
    from serving.rank0_frontend import Frontend
    from serving.rank_health import RankState

log = logging.getLogger(__name__)

# What a collective raises when another rank of the group is gone (gloo: its peer's socket closed;
# NCCL: a remote error or an aborted communicator): the group cannot go on without it.
LOST_PEER_MARKS = (
    "/gloo/transport/",
    "Connection closed by peer",
    "Connection reset by peer",
    "remote process exited",
    "NCCL communicator was aborted",
    "ncclRemoteError",
)
EXIT_LOST_PEER = 3  # this rank's exit status when another rank is gone


def lost_peer(error: BaseException) -> bool:
    """Whether ``error`` says another rank of the group is gone (a collective failed on its link)."""
    import torch.distributed as dist

    if isinstance(error, dist.DistNetworkError):
        return True
    text = str(error)
    return any(mark in text for mark in LOST_PEER_MARKS)


def _step_loop(env: DistEnv, spec: DeepSpeedSpec, model: Any, state: RankState, frontend: Frontend | None) -> None:
    """Every rank: receive the next step's plan from rank 0, run it, and (rank 0) answer.

    A plan (``serving.messages.Plan``) is one broadcast: its work (a forward pass, a generation
    without the engine, or a tick when idle), the generation requests that join the engine's
    batch, and those cancelled. Every rank then runs the same
    engine step, so a decoding step costs one collective round for the whole batch (and one
    broadcast of its tokens, rank 0's, which every rank goes on with).

    A collective that fails because another rank is gone (``lost_peer``) ends this rank at once
    (exit status ``EXIT_LOST_PEER``) rather than answering its requests with errors.
    """
    engine = _engine(model) if model.can_generate and spec.batching else None
    if frontend is not None and engine is not None:
        frontend.attach(engine)
    try:
        _steps(spec, model, state, frontend, engine)
    except Exception as e:
        if not lost_peer(e):
            raise
        # The survivors cannot go on alone, and answering the requests in flight with errors would
        # tell a client (or the front) that they failed: this rank exits at once, its connections
        # close unanswered, the front sends what is safe again once the group restarts whole.
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        print(f"rank {env.rank}: another rank of the group is gone ({why}); exiting", file=sys.stderr, flush=True)
        os._exit(EXIT_LOST_PEER)


def _steps(spec: DeepSpeedSpec, model: Any, state: RankState, frontend: Frontend | None, engine: Any) -> None:
    """The loop itself: returns only by raising."""
    import torch.distributed as dist

    sequences: dict[str, Any] = {}
    held: list[tuple[Forward | Generate, Future[Any]]] = []  # rank 0: work waiting for its step
    while True:
        done: Future[Any] | None = None
        plan = Plan()
        if frontend is not None:
            plan, done = _plan(frontend, held, spec.tick_s, busy=engine is not None and engine.has_work())
        message: list[Any] = [plan]
        state.busy_since = time.monotonic()
        dist.broadcast_object_list(message, src=0)
        plan = message[0]
        adds, cancels = plan.adds, plan.cancels
        started = time.perf_counter()
        try:
            result = _run(model, plan.work)
        except Exception as e:  # every rank fails the same way on the same input; keep serving
            if lost_peer(e):
                raise
            if done is not None:
                done.set_exception(e)
        else:
            if done is not None:
                done.set_result((result, (time.perf_counter() - started) * 1000))
        if engine is not None and (adds or cancels or engine.has_work()):
            engine = _engine_step(engine, model, sequences, adds, cancels, frontend)
            if frontend is not None and engine is not frontend.engine:  # a fresh one after an error
                frontend.attach(engine)
        state.steps += 1
        state.last_step = time.monotonic()
        state.busy_since = None


def _plan(
    frontend: Frontend, held: list[tuple[Forward | Generate, Future[Any]]], tick_s: float, busy: bool
) -> tuple[Plan, Future[Any] | None]:
    """Rank 0: the next step's plan from what the HTTP threads queued (waiting up to ``tick_s``
    for some when idle), and the future its work answers. Work beyond one piece waits in ``held``."""
    adds: list[Add] = []
    cancels: list[str] = []
    for command, future in _drain(frontend.commands, 0 if busy or held else tick_s):
        match command:
            case Add():
                adds.append(command)  # answered through its events (``frontend.streams``), not a future
            case Cancel(request_id):
                cancels.append(request_id)
            case Forward() | Generate():
                held.append((command, future))
    work, done = held.pop(0) if held else (Tick(), None)
    return Plan(work, tuple(adds), tuple(cancels)), done


def _run(model: Any, work: Work) -> Any:
    """A step's piece of work besides the engine's batch, on this rank."""
    match work:
        case Forward(ids):
            return model.forward(ids)
        case Generate(prompts, new_tokens):
            return model.generate(prompts, new_tokens)
    return None  # a tick


def _drain(commands: queue.Queue[Any], wait_s: float) -> list[Any]:
    """What the HTTP threads queued: block up to ``wait_s`` for the first item, then take the rest."""
    items = []
    try:
        items.append(commands.get(timeout=wait_s) if wait_s > 0 else commands.get_nowait())
        while True:
            items.append(commands.get_nowait())
    except queue.Empty:
        return items


def _engine(model: Any) -> Any:
    """The engine every rank runs. With several ranks each step's tokens are rank 0's (one small
    broadcast after sampling): whether a sequence fails, and which token each one takes, is rank
    0's decision on every rank, so scores a rounding apart cannot split the ranks' batches."""
    import torch.distributed as dist

    engine = model.engine()
    if dist.is_initialized() and dist.get_world_size() > 1:
        engine.agree = _rank_0s_tokens
        engine.fatal = lost_peer
    return engine


def _rank_0s_tokens(tokens: Any) -> Any:
    import torch.distributed as dist

    dist.broadcast(tokens, src=0)
    return tokens


def _engine_step(
    engine: Any,
    model: Any,
    sequences: dict[str, Any],
    adds: tuple[Add, ...],
    cancels: tuple[str, ...],
    frontend: Frontend | None,
) -> Any:
    """One step of the engine on every rank; rank 0 answers the requests that finished.
    Returns the engine to go on with (a fresh one after an error, which every rank meets alike)."""
    from serving.engine import SamplingParams

    try:
        for add in adds:
            params = SamplingParams(max_tokens=add.max_tokens, **add.sampling)
            seq = sequences[add.request_id] = engine.add(add.prompt, params, request_id=add.request_id)
            if frontend is not None and add.request_id in frontend.streams:
                seq.events = frontend.streams.pop(add.request_id)  # before any step: no event is lost
        for request_id in cancels:
            if request_id in sequences:
                sequences[request_id].cancel()
        engine.step()
    except Exception as e:  # a whole step failed (not one sequence): every sequence in it ends with an error
        if lost_peer(e):
            raise
        log.exception("an engine step failed; its %d sequences end with an error", len(sequences))
        for seq in sequences.values():
            seq.events.put(ErrorEvent("the engine step failed; see rank 0's log"))
            seq.events.put(EndEvent(FinishReason.ERROR))
        sequences.clear()
        return _engine(model)
    if frontend is not None:
        frontend.view.engine = {"running": engine.running, "waiting": engine.waiting, **engine.finished}
    for request_id in [r for r, seq in sequences.items() if seq.done]:
        del sequences[request_id]  # its events, the last an EndEvent, told its reader how it ended
    return engine
