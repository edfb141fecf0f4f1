"""Exponential moving averages of weights, one update per optimizer step.

- :class:`EMA`: a float32 shadow of the student's LoRA weights (evaluation, saving).
- :func:`old_policy_decay` + :func:`ema_update_`: DiffusionNFT's "old" sampling policy, a
  second set of live weights (the old adapter) pulled towards the student with a decay that
  ramps up over training.
"""
from __future__ import annotations

from contextlib import contextmanager

from typing import Iterable

import torch


class EMA:
    """``shadow <- d_n * shadow + (1 - d_n) * param`` once per optimizer step.

    Without warm-up ``d_n = decay`` from the very first step, so the shadow starts at the
    initial weights and forgets them at rate ``decay`` per step. With ``warmup=True`` (the
    stage-1 configs, as both DiffusionNFT and Flow-GRPO train), ``d_n = min(decay, (1 + n) /
    (10 + n))`` with ``n`` the number of optimizer steps INCLUDING the one just taken (n = 1 at
    the first update: d = 2/11, then 3/12, 4/13, ...): the peers call their EMA with the step
    counter after incrementing it, as diffusers' ``EMAModel`` increments before computing its
    decay. The early steps pass almost unaveraged, so the shadow is not dragged by the init.

    The release stepped its EMA once per micro-batch; stepping per optimizer step makes the
    decay mean the same thing whatever the accumulation.
    """

    def __init__(self, params: list[torch.nn.Parameter], decay: float, warmup: bool = False):
        self.params = list(params)
        self.decay = decay
        self.warmup = warmup
        self.shadow = [p.detach().float().clone() for p in self.params]
        self.num_updates = 0

    def current_decay(self) -> float:
        """The decay the next update uses (``n`` = that update's number, counted from 1)."""
        n = self.num_updates + 1
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        decay = self.current_decay()
        self.num_updates += 1
        for s, p in zip(self.shadow, self.params):
            s.mul_(decay).add_(p.detach().float(), alpha=1 - decay)

    @contextmanager
    def swapped_in(self):
        """Temporarily put the EMA weights into the live parameters (evaluation, saving)."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params):
                p.copy_(s.to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for b, p in zip(backup, self.params):
                    p.copy_(b)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(f"EMA state has {len(state['shadow'])} tensors, the student has {len(self.shadow)}")
        from .sharding import copy_full_

        self.num_updates = state["num_updates"]
        for s, saved in zip(self.shadow, state["shadow"]):
            copy_full_(s, saved)  # a sharded shadow (distributed.strategy=fsdp) takes its shard


def old_policy_decay(step: int, rate: float = 0.001, max_decay: float = 0.5, delay: int = 0) -> float:
    """DiffusionNFT's old-policy decay: ``0`` before ``delay`` steps, then
    ``min(rate * (step - delay), max_decay)``.

    ``step`` is the number of optimizer steps taken so far. Decay 0 copies the student into the
    old policy (fully on-policy sampling); the ramp lets the sampler lag more and more behind
    the student as training settles. DiffusionNFT's schedules (its ``decay_type``): 1 =
    ``rate 0.001, max 0.5, delay 0`` (the default; its GenEval and PickScore recipes) and 2 =
    ``rate 0.0075, max 0.999, delay 75`` (its OCR recipe). The reference applies it once per
    round (epoch) with ``step`` = optimizer steps taken so far, as trainers/nft.py does.
    """
    if step < 0 or rate < 0 or delay < 0 or not 0 <= max_decay <= 1:
        raise ValueError(f"old_policy_decay: need step, rate, delay >= 0 and max_decay in [0, 1]; "
                         f"got step={step}, rate={rate}, max_decay={max_decay}, delay={delay}")
    if step < delay:
        return 0.0
    return min(rate * (step - delay), max_decay)


@torch.no_grad()
def ema_update_(target: Iterable[torch.Tensor], source: Iterable[torch.Tensor], decay: float) -> None:
    """In place, per tensor: ``target <- decay * target + (1 - decay) * source``.

    Computed in float32 and written back in the target's dtype (the old adapter may be fp16 /
    bf16); ``decay = 0`` copies ``source`` exactly. ``source`` is not modified.
    """
    if not 0 <= decay <= 1:
        raise ValueError(f"ema_update_: decay must be in [0, 1], got {decay}")
    target, source = list(target), list(source)
    if len(target) != len(source):
        raise ValueError(f"ema_update_: {len(target)} target tensors but {len(source)} source tensors")
    for t, s in zip(target, source):
        if t.shape != s.shape:
            raise ValueError(f"ema_update_: shape {tuple(t.shape)} != {tuple(s.shape)}")
        if decay == 0:
            t.copy_(s)
        else:
            t.copy_(decay * t.float() + (1 - decay) * s.detach().float())
