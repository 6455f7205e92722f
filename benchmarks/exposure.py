"""What another machine can reach of the local default: run `nodewise demo --detach` (a Serve app
and a two-rank DeepSpeed job), list every TCP port its processes listen on, and probe each from
another network host (a namespace joined to this one by a veth pair; benchmarks/_netns.py): an HTTP
GET and an inference POST, and where no HTTP answers, a gRPC call without Ray's token.

    python benchmarks/exposure.py                  # this checkout
    python benchmarks/exposure.py --source DIR     # another checkout (e.g. a `git worktree` of an older commit)

Needs root and iproute2. The last line is one JSON object: ports listening, how many on a
non-loopback address, and what each of those answered.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OP_CACHE = os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".nodewise" / "torch_extensions"))

from benchmarks._netns import peer_host, probe  # noqa: E402
from nodewise.core.procs import free_port_block  # noqa: E402
from nodewise.ops.processes import listening, loopback, remove_state  # noqa: E402


def nodewise(source: Path, env: dict[str, str], *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    code = "from nodewise.cli.app import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, cwd=source, capture_output=True, text=True, timeout=timeout
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=ROOT, help="the checkout whose nodewise runs")
    args = parser.parse_args()
    source = args.source.resolve()
    state = Path(tempfile.mkdtemp(prefix="nw-exp-", dir="/tmp"))
    base = free_port_block(6)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NODEWISE_", "RAY_", "PREFECT_", "MLFLOW_"))}
    env.update(
        {
            "PYTHONPATH": str(source),
            "NODEWISE_STATE_DIR": str(state),
            "NODEWISE_RAY__PORT": str(base),
            "NODEWISE_SERVE__PORT": str(base + 4),
            "NODEWISE_DEEPSPEED__PORT": str(base + 5),
            "NODEWISE_DEEPSPEED__OP_CACHE_DIR": OP_CACHE,
        }
    )
    try:
        demo = nodewise(source, env, "demo", "--detach")
        if demo.returncode != 0:
            raise SystemExit(f"demo failed: {demo.stderr[-2000:]}")
        ports = listening(str(state))
        with peer_host() as peer:
            answers = probe(peer, sorted(ports))
    finally:
        nodewise(source, env, "down", timeout=300)
        remove_state(state)
    exposed = {port: where for port, where in ports.items() if not loopback(where[1])}
    for port, (name, address) in sorted(exposed.items(), key=lambda kv: kv[1]):
        print(f"{name} {address}:{port} -> {answers[port]!r}")
    kinds = collections.Counter(answers[port].split(":")[0].split(" (")[0] for port in exposed)
    print(
        json.dumps(
            {
                "source": str(source),
                "listening": len(ports),
                "not_loopback": len(exposed),
                "answered_http": sorted(str(p) for p in exposed if answers[p].startswith("http ")),
                "outcomes": dict(kinds),
                "grpc_unauthenticated": sum(answers[p].endswith("grpc UNAUTHENTICATED") for p in exposed),
            }
        )
    )


if __name__ == "__main__":
    main()
