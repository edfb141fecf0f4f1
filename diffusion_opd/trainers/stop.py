"""SIGTERM / SIGINT: finish the current round, write a checkpoint, exit non-zero saying how to resume.

Schedulers (SLURM, Kubernetes) send SIGTERM some seconds before they kill a job, and Ctrl-C sends
SIGINT; killing the run mid-round would lose everything since the last checkpoint. The handler
only records the request; the training loop asks :meth:`StopRequest.agreed` after each round
(one all-reduce, so every process stops after the same round even if only one was signalled),
checkpoints, and raises :class:`RunStopped`. A second signal stops at once (KeyboardInterrupt).
"""
from __future__ import annotations

import signal
import threading
from typing import Optional

from ..errors import UserError

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunStopped(UserError):
    """The run stopped on a signal after checkpointing; the message says how to resume."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention for "ended by signal N"


class StopRequest:
    """Context manager installing the handlers (main thread only; elsewhere it does nothing)."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # second signal: stop now
        self.signum = signum
        print(f"\n[run] {signal.Signals(signum).name} received: finishing the current round and writing a "
              "checkpoint (send it again to stop at once)", flush=True)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def agreed(self, accelerator) -> Optional[int]:
        """The signal number if any process was asked to stop, else None (same on all processes)."""
        if accelerator.num_processes == 1:
            return self.signum
        import torch

        flags = torch.tensor([float(self.signum == s) for s in SIGNALS], device=accelerator.device)
        flags = accelerator.reduce(flags, reduction="sum")  # every process takes part, signalled or not
        return next((int(s) for s, f in zip(SIGNALS, flags.tolist()) if f > 0), None)
