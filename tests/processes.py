"""Helpers for tests that start real processes: a free port, stopping a training process part-way
(kill / signal + resume)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


def free_port() -> int:
    """A free TCP port on loopback (for torchrun's / accelerate's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def signal_once_written(proc: subprocess.Popen, path: str, sig: int = signal.SIGKILL, timeout: float = 300) -> None:
    """Wait until ``path`` exists (or the process ended, or ``timeout`` s passed), then send
    ``sig`` to ``proc`` and wait for it to end. Checkpoints are published by an atomic rename,
    so a ``round-N`` folder that exists is complete."""
    deadline = time.time() + timeout
    while not os.path.exists(path) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    proc.wait()
