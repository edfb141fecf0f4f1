"""The latent-sized maths between transformer forwards, compiled when ``perf.compile`` is on.

Per trained step a round runs, outside the transformer: the CFG combine of the student and of
the teacher, two transition means and the per-step loss. Each is a chain of element-wise
kernels on latent-sized tensors; compiled, each chain is one kernel. The functions marked
``@fusable`` run eagerly unless a :func:`compiled` context is active: the trainer enters it for
its round when ``perf.compile`` is on, so a process holding several policies (tests, the
benchmark) compiles only the runs that asked for it.

A fusable function takes tensors for everything that changes from call to call (sigmas are
0-d / per-sample device tensors, made with ``torch.full``, never Python numbers moved to the
device) and Python constants for what is fixed per run (noise level, reduction), so it is
traced once per shape and never recompiled per step.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Callable, Optional

import torch

__all__ = ["fusable", "compiled", "active_options"]

_OPTIONS: Optional[dict] = None  # torch.compile options while a compiled() context is active
_CACHE: dict[tuple, Callable] = {}  # (function, options) -> its compiled version


def fusable(fn: Callable) -> Callable:
    """Run ``fn`` compiled inside :func:`compiled`, eagerly otherwise (``.eager`` is ``fn``)."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        if _OPTIONS is None:
            return fn(*args, **kwargs)
        key = (fn, tuple(sorted(_OPTIONS.items())))
        compiled_fn = _CACHE.get(key)
        if compiled_fn is None:
            compiled_fn = _CACHE[key] = torch.compile(fn, **_OPTIONS)
        return compiled_fn(*args, **kwargs)

    call.eager = fn
    return call


@contextmanager
def compiled(backend: str = "inductor", dynamic: bool = False, fullgraph: bool = True):
    """Inside: every :func:`fusable` function runs through ``torch.compile`` with these options."""
    global _OPTIONS
    previous, _OPTIONS = _OPTIONS, dict(backend=backend, dynamic=dynamic, fullgraph=fullgraph)
    try:
        yield
    finally:
        _OPTIONS = previous


def active_options() -> Optional[dict]:
    """The compile options in force (None: eager)."""
    return None if _OPTIONS is None else dict(_OPTIONS)
