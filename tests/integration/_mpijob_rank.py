"""A rank for the MPIJob contract test: derives its environment as serving.deepspeed_worker does
(serving.dist_env), meets the others over gloo, all-reduces, writes FOLDER/rank-N.json."""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from serving.dist_env import discover, network_exports, route_source

# The worker pods of an MPIJob have no hostfile: rank 0's host must come from the launcher.
given = os.environ.get("MASTER_ADDR")
env = discover(os.environ)
os.environ.update(env.exports())
os.environ.update(network_exports(env, os.environ))
dist.init_process_group("gloo", rank=env.rank, world_size=env.world_size, timeout=timedelta(seconds=60))
total = torch.tensor([env.rank + 1])
dist.all_reduce(total)
record = {
    "launcher": env.launcher,
    "rank": env.rank,
    "world_size": env.world_size,
    "local_size": env.local_size,
    "master_addr": env.master_addr,
    "master_addr_given": given,
    "address": route_source(env.master_addr),
    "sum": int(total.item()),
}
with open(os.path.join(sys.argv[1], f"rank-{env.rank}.json"), "w") as out:
    json.dump(record, out)
dist.destroy_process_group()
