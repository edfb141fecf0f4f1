"""Exponential moving average of the student's LoRA weights, one update per optimizer step."""
from __future__ import annotations

from contextlib import contextmanager

import torch


class EMA:
    """``shadow <- d_n * shadow + (1 - d_n) * param`` once per optimizer step (n = steps so far).

    Without warm-up ``d_n = decay`` from the very first step, so the shadow starts at the
    initial weights and forgets them at rate ``decay`` per step (the release's behaviour and the
    default). With ``warmup=True``, ``d_n = min(decay, (1 + n) / (10 + n))``: the ramp of
    diffusers' ``EMAModel`` (use_ema_warmup=False) and the peers' trainers, which lets the early
    steps through almost unaveraged (d_0 = 0.1) so the shadow is not dragged by the init.

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
        """The decay the next update uses."""
        n = self.num_updates
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
        self.num_updates = state["num_updates"]
        for s, saved in zip(self.shadow, state["shadow"]):
            s.copy_(saved)
