"""The learning-rate schedule (trainers/schedule.py, diffusers' schedulers): the factor of every
optimizer step, read from the real scheduler driving a real AdamW, and its exact resume."""
import math

import pytest
import torch

from diffusion_opd.config import base_config
from diffusion_opd.trainers.schedule import build_scheduler


def _config(schedule="constant", warmup=0, rounds=6, recipe="opd", updates=1):
    c = base_config()
    c.recipe, c.train.lr_schedule, c.train.warmup_rounds, c.train.num_rounds = recipe, schedule, warmup, rounds
    c.rl.updates_per_round = updates
    return c


def _factors(config, steps=None):
    """The factor (lr / peak) each optimizer step runs with."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    scheduler = build_scheduler(optimizer, config)
    out = []
    for _ in range(steps or config.train.num_rounds * config.rl.updates_per_round):
        out.append(optimizer.param_groups[0]["lr"] / 1e-3)
        optimizer.step()
        scheduler.step()
    return out


def _cos(k, n):  # half cosine from 1 at step 0 to 0 at step n (the step after the last trained one)
    return 0.5 * (1 + math.cos(math.pi * k / n))


@pytest.mark.parametrize("schedule, warmup, rounds, expected", [
    ("constant", 0, 4, [1, 1, 1, 1]),
    ("constant", 2, 5, [0, 0.5, 1, 1, 1]),
    ("cosine", 0, 4, [1, _cos(1, 4), 0.5, _cos(3, 4)]),
    ("cosine", 2, 6, [0, 0.5, 1, _cos(1, 4), 0.5, _cos(3, 4)]),
    ("linear", 1, 5, [0, 1, 0.75, 0.5, 0.25]),
])
def test_factor_table(schedule, warmup, rounds, expected):
    assert _factors(_config(schedule, warmup, rounds)) == pytest.approx(expected, abs=1e-12)


def test_warmup_reaches_exactly_the_peak_and_the_last_cosine_step_is_not_zero():
    """The issue's case: 100 warm-up rounds of 300 (the old hand-written schedule peaked at 0.75
    and trained its last round at 0)."""
    factors = _factors(_config("cosine", warmup=100, rounds=300))
    assert max(factors) == 1.0 and factors[100] == 1.0
    assert factors[99] == pytest.approx(0.99) and factors[0] == 0.0
    assert factors[-1] == pytest.approx(_cos(199, 200)) and factors[-1] > 0


def test_stage1_recipes_schedule_over_their_optimizer_steps():
    """nft / grpo take rl.updates_per_round steps a round: the cosine spans all of them."""
    factors = _factors(_config("cosine", warmup=1, rounds=3, recipe="nft", updates=2))
    assert factors == pytest.approx([0, 0.5, 1, _cos(1, 4), 0.5, _cos(3, 4)], abs=1e-12)


def test_resume_restores_the_schedule_exactly():
    config = _config("cosine", warmup=2, rounds=8)
    full = _factors(config)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    scheduler = build_scheduler(optimizer, config)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    saved = (optimizer.state_dict(), scheduler.state_dict())
    param2 = torch.nn.Parameter(torch.zeros(1))
    optimizer2 = torch.optim.AdamW([param2], lr=1e-3)
    scheduler2 = build_scheduler(optimizer2, config)  # a fresh process: factor of step 0
    optimizer2.load_state_dict(saved[0])
    scheduler2.load_state_dict(saved[1])
    rest = []
    for _ in range(5):
        rest.append(optimizer2.param_groups[0]["lr"] / 1e-3)
        optimizer2.step()
        scheduler2.step()
    assert rest == full[3:]
