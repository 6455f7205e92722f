#!/usr/bin/env bash
# Set up nodewise in .venv at the repository root: Open MPI from the distribution (root or sudo),
# then every Python package in ONE pip resolve (the pins in pyproject.toml are the set measured
# together). Re-running is cheap: pip runs again only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] < (3, 13) else 1)'; then
    echo "error: nodewise needs Python 3.11 or 3.12; $PYTHON is $("$PYTHON" --version 2>&1). Set PYTHON=python3.11" >&2
    exit 1
fi

if ! command -v mpirun >/dev/null 2>&1 || ! command -v ip >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
    if [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; then
        echo "setup: installing Open MPI (openmpi-bin) for the multi-node DeepSpeed backend, iproute2 for the multihost tests"
        log=$(mktemp)
        if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
                $SUDO apt-get install -y -qq openmpi-bin libopenmpi-dev iproute2; } >"$log" 2>&1; then
            cat "$log" >&2; echo "error: installing Open MPI failed (above)" >&2; exit 1
        fi
        rm -f "$log"
    else
        echo "setup: warning: mpirun not found and no root/sudo: the multi-node backend will not run" >&2
    fi
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.nodewise-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    echo "setup: installing nodewise and its dependencies into .venv (one resolve, ~3 min the first time)"
    .venv/bin/pip install --quiet --disable-pip-version-check -e '.[dev]' 2> >(grep -v "is ignored: it is neither" >&2)
    echo "$want" > "$stamp"
fi
echo "setup: ready ($(.venv/bin/python --version), $(.venv/bin/nodewise --help >/dev/null && echo nodewise OK))"
