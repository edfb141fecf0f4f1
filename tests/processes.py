"""Helpers for tests that stop a real training process part-way (kill / signal + resume)."""
from __future__ import annotations

import os
import signal
import subprocess
import time


def signal_once_written(proc: subprocess.Popen, path: str, sig: int = signal.SIGKILL, timeout: float = 300) -> None:
    """Wait until ``path`` exists (or the process ended, or ``timeout`` s passed), then send
    ``sig`` to ``proc`` and wait for it to end. Checkpoints are published by an atomic rename,
    so a ``round-N`` folder that exists is complete."""
    deadline = time.time() + timeout
    while not os.path.exists(path) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    proc.wait()
