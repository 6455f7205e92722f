"""The peer: what a user writes by hand without nodewise, run under
``mpirun -np N -x LOCAL_SIZE=N -x MASTER_ADDR -x MASTER_PORT python _handwritten_deepspeed.py MODEL_DIR SEQ REPS``.

Every rank loads the saved transformers model, AutoTP-shards it and runs the same forward pass
REPS times, then generates 16 tokens greedily 10 times (no server, no broadcast: the inputs
are fixed). Rank 0 prints one JSON line: seconds
from process start to sharded, and per-forward latencies in ms.
"""

from __future__ import annotations

import time

_T0 = time.monotonic()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402


def main() -> None:
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    model_dir, seq, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    # The lines every user writes by hand (no mpi4py here for DeepSpeed's own MPI discovery).
    os.environ["RANK"] = os.environ["OMPI_COMM_WORLD_RANK"]
    os.environ["WORLD_SIZE"] = os.environ["OMPI_COMM_WORLD_SIZE"]
    os.environ["LOCAL_RANK"] = os.environ["OMPI_COMM_WORLD_LOCAL_RANK"]
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    world = dist.get_world_size()
    if world > 1:
        model = deepspeed.init_inference(
            model, tensor_parallel={"tp_size": world}, dtype=torch.float32, replace_with_kernel_inject=False
        ).module
    ready_s = time.monotonic() - _T0
    ids = (torch.arange(seq) % 90 + 3).reshape(1, -1)
    latencies = []
    with torch.inference_mode():
        for _ in range(reps):
            start = time.perf_counter()
            model(ids)
            latencies.append((time.perf_counter() - start) * 1000)
        generate = []
        for _ in range(20):
            start = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False, pad_token_id=2)
            generate.append((time.perf_counter() - start) * 1000)
    if int(os.environ.get("OMPI_COMM_WORLD_RANK", "0")) == 0:
        print(json.dumps({"ready_s": ready_s, "latencies_ms": latencies, "generate_ms": generate}), flush=True)


if __name__ == "__main__":
    main()
