"""Run one benchmark against another checkout of nodewise and this one, side by side in one run.

For a refactor's "no regression" figures: the same script, the same arguments, first from the
baseline checkout (a ``git worktree`` of the commit before the change) and then from this one,
``--rounds`` times alternately, so both see the same machine in the same hour. Each side runs with
its own checkout first on ``PYTHONPATH`` and as the working directory, so the processes it starts
(``nodewise deploy``, Ray's workers, mpirun's ranks) import that checkout's code; the virtual
environment is this one's (the packages are the same pins).

Printed: each side's last JSON line per round, and for each numeric leaf found on both sides (e.g.
``servers.nodewise-fixed-2.c8.rps``) the ratio this/baseline of their medians over the rounds.

Usage: .venv/bin/python benchmarks/against_tree.py --baseline ../wt-old [--rounds 1]
       -- benchmarks/serve_throughput.py --fixed 2 --only nodewise-fixed-2
(last line: one JSON object)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_side(tree: Path, script_args: list[str]) -> dict[str, Any]:
    """The script's last JSON line, run from ``tree`` with that tree's code first on the path."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, str(tree / script_args[0]), *script_args[1:]]
    print(f"== {tree}: {' '.join(script_args)}", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": f"exit {done.returncode}", "tail": done.stdout[-2000:]}
    return json.loads(lines[-1])


def leaves(value: Any, prefix: str = "") -> dict[str, float]:
    """Every numeric leaf of a JSON value, by its dotted path."""
    if isinstance(value, bool):
        return {}
    if isinstance(value, int | float):
        return {prefix: float(value)}
    out: dict[str, float] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            out.update(leaves(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


def ratios(baseline: list[dict[str, Any]], current: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per numeric leaf on both sides: the medians and current/baseline."""
    old = [leaves(r) for r in baseline]
    new = [leaves(r) for r in current]
    shared = set.intersection(*(set(d) for d in old + new)) if old and new else set()
    out = {}
    for key in sorted(shared):
        before = statistics.median(d[key] for d in old)
        after = statistics.median(d[key] for d in new)
        out[key] = {"baseline": before, "current": after, "x": round(after / before, 3) if before else None}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, type=Path, help="the other checkout (a git worktree)")
    parser.add_argument("--rounds", type=int, default=1, help="baseline then current, this many times")
    parser.add_argument("script", nargs=argparse.REMAINDER, help="-- benchmarks/NAME.py [its arguments]")
    args = parser.parse_args()
    script = args.script[1:] if args.script[:1] == ["--"] else args.script
    baseline = args.baseline.resolve()
    if not script or not (baseline / script[0]).is_file() or not (ROOT / script[0]).is_file():
        raise SystemExit(f"against_tree: {script[:1]} must be a script in both {baseline} and {ROOT}")
    commits = {
        side: subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        for side, tree in (("baseline", baseline), ("current", ROOT))
    }
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "current": []}
    for _ in range(args.rounds):
        runs["baseline"].append(run_side(baseline, script))
        runs["current"].append(run_side(ROOT, script))
    ok = {side: [r for r in found if "error" not in r] for side, found in runs.items()}
    summary = {
        "benchmark": "against_tree",
        "script": " ".join(script),
        "commits": commits,
        "rounds": args.rounds,
        "runs": runs,
        "ratios": ratios(ok["baseline"], ok["current"]),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
