"""The test and benchmark server harness (service/devserver.py): a server never outlives the
process that started it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

PARENT = """
import subprocess, sys, time
sys.path.insert(0, {root!r})
from service.devserver import _terminate_with_parent
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"],
                         start_new_session=True, preexec_fn=_terminate_with_parent)
print(child.pid, flush=True)
time.sleep(300)
"""


def test_a_started_process_dies_with_its_killed_parent() -> None:
    """SIGKILL the starter (as a killed test run is): its child (in its own session, as the
    server is) gets SIGTERM and exits instead of being left behind."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parent = subprocess.Popen([sys.executable, "-c", PARENT.format(root=root)],
                              stdout=subprocess.PIPE, text=True)
    child = psutil.Process(int(parent.stdout.readline()))
    assert child.is_running() and child.status() != psutil.STATUS_ZOMBIE
    parent.send_signal(signal.SIGKILL)
    parent.wait(10)
    deadline = time.monotonic() + 10
    while child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the child outlived its killed parent"
        time.sleep(0.05)
