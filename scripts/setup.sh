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

# System packages, each installed only when missing: Open MPI (the multi-node backend), iproute2 (the
# multihost tests' network namespaces), a C++ compiler and Python headers (DeepSpeed builds its CPU
# op on first use), curl (the demo prints a curl line, the e2e journey runs it), Prometheus and
# promtool (metrics: the scrape test, `promtool check rules`/`test rules`).
missing=()
command -v mpirun >/dev/null 2>&1 || missing+=(openmpi-bin libopenmpi-dev)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v g++ >/dev/null 2>&1 || missing+=(g++)
pyinc=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
[ -f "$pyinc/Python.h" ] || missing+=(python3-dev)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
    if [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; then
        echo "setup: installing ${missing[*]}"
        log=$(mktemp)
        if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
                $SUDO apt-get install -y -qq -o DPkg::Lock::Timeout=300 --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
            cat "$log" >&2; echo "error: installing ${missing[*]} failed (above)" >&2; exit 1
        fi
        rm -f "$log"
    else
        echo "setup: warning: missing ${missing[*]} and no root/sudo: install them (apt-get install ${missing[*]});" \
            "the multi-node backend, the DeepSpeed op build or the metrics tests will not run without them" >&2
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
