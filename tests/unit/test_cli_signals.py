"""The demo's foreground wait ends the same way on Ctrl-C and on SIGTERM (what systemd, kubectl or
a CI runner sends). The e2e journey (tests/e2e/test_cli_journey.py) runs the whole demo and stops
it with Ctrl-C; here each signal is sent for real to a fresh interpreter that installed the handler."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

_WAIT = r"""
import os, signal, sys, time
from nodewise.cli.app import _stop_on_signals
signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited ignored, as under nohup or a shell's `&`
_stop_on_signals()
try:  # the signal may land while "waiting" is still being printed: inside the try too
    print("waiting", flush=True)
    time.sleep(60)
except KeyboardInterrupt:
    print("stopping", flush=True)
    sys.exit(0)
sys.exit(7)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_both_signals_end_the_wait_through_the_same_stop(sig: int) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _WAIT], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "waiting"
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert rest.strip() == "stopping"
