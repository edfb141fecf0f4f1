"""The learning-rate schedule: diffusers' library schedulers (``diffusers.optimization``), one
scheduler step per optimizer step.

``train.lr_schedule`` names the shape (constant | cosine | linear) and ``train.warmup_rounds``
the rounds of linear warm-up before it. The library's conventions, which the peers' training
scripts share: during warm-up the factor of optimizer step ``k`` (0-based) is ``k / W``, so step
``W`` runs at exactly the peak; cosine and linear then decay over the remaining steps and reach
0 one step *after* the last trained one, so every trained step has a non-zero rate.
"""
from __future__ import annotations

import torch


def optimizer_steps_per_round(config) -> int:
    """Optimizer steps a round takes, as the recipe declares (diffusion_opd/recipes.py): one for
    OPD; the stage-1 recipes take ``rl.updates_per_round`` per pass, ``rl.inner_epochs`` passes."""
    from ..recipes import recipe_spec

    return recipe_spec(config.recipe).optimizer_steps_per_round(config)


def build_scheduler(optimizer: torch.optim.Optimizer, config) -> torch.optim.lr_scheduler.LambdaLR:
    """The library scheduler of ``train.lr_schedule`` over the run's optimizer steps."""
    from diffusers.optimization import get_scheduler

    t = config.train
    per_round = optimizer_steps_per_round(config)
    warmup, total = t.warmup_rounds * per_round, t.num_rounds * per_round
    name = t.lr_schedule
    if name == "constant" and warmup:
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)
