"""Why a run stops early: a signal, or a loss that stays non-finite.

SIGTERM / SIGINT: finish the current round, write a checkpoint, exit non-zero saying how to resume.

Schedulers (SLURM, Kubernetes) send SIGTERM some seconds before they kill a job, and Ctrl-C sends
SIGINT; killing the run mid-round would lose everything since the last checkpoint. The handler
only records the request; the training loop asks :meth:`StopRequest.agreed` after each round
(one all-reduce, so every process stops after the same round even if only one was signalled),
checkpoints, and raises :class:`RunStopped`. A second signal stops at once (KeyboardInterrupt).

A round whose loss or gradient norm is NaN / inf takes no step (:class:`NonFiniteGuard`);
``train.nan_patience`` such rounds in a row stop the run with :class:`NonFiniteError`.
"""
from __future__ import annotations

import math
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


class NonFiniteError(UserError, FloatingPointError):
    """Training diverged (non-finite loss, gradients or weights); nothing non-finite was saved."""

    exit_code = 1


class NonFiniteGuard:
    """Skip a round whose loss or gradient norm is NaN/inf (no step: the weights stay finite);
    stop with a clear error after ``patience`` such rounds in a row."""

    def __init__(self, patience: int, streak: int = 0):
        self.patience = patience
        self.streak = streak

    def should_skip(self, loss: float, round_idx: int, grad_norm: float = 0.0) -> bool:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.streak = 0
            return False
        self.streak += 1
        if self.streak >= self.patience:
            raise NonFiniteError(
                f"round {round_idx}: the loss was non-finite for {self.streak} rounds in a row "
                f"(train.nan_patience={self.patience}); no step was taken in those rounds. Lower "
                "train.learning_rate, check the teachers' outputs, or resume from the last checkpoint."
            )
        return True
