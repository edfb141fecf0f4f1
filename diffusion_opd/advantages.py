"""Group-relative advantages for stage-1 RL (DiffusionNFT, Flow-GRPO, GRPO-Guard).

Every prompt is sampled ``k`` times (a *group*); a sample's advantage is its reward relative to
its own group::

    A_i = (R_i - mean_{j in g(i)} R_j) / (std + eps)

with ``std`` either the standard deviation of the WHOLE batch (``std="global"``: what both
DiffusionNFT's and Flow-GRPO's released configs run, ``global_std=True``) or the group's own
(``std="group"``: the Flow-GRPO paper's formula); ``eps = 1e-4`` in both. Standard
deviations are population ones (``ddof = 0``), as the peers compute them with ``np.std``.
The batch must be the gathered one (every process's samples) so that groups split across
processes see all their members; gathering is the caller's job, this module is pure.

Multi-reward training passes the weighted sum (``MultiReward(...)["total"]``) as ``rewards``.
"""
from __future__ import annotations

from typing import Hashable, Optional, Sequence, Union

import numpy as np
import torch

__all__ = ["group_ids", "group_advantages", "nonzero_advantage_mask"]

Groups = Union[torch.Tensor, np.ndarray, Sequence[Hashable]]


def group_ids(groups: Groups) -> torch.Tensor:
    """Labels (prompt strings, prompt indices, any hashables) -> int64 group ids 0..G-1 in
    order of first appearance."""
    if isinstance(groups, (torch.Tensor, np.ndarray)):
        groups = groups.tolist()
    index: dict = {}
    return torch.tensor([index.setdefault(g, len(index)) for g in groups], dtype=torch.int64)


def group_advantages(
    rewards: Union[torch.Tensor, np.ndarray, Sequence[float]],
    groups: Groups,
    std: str = "group",
    eps: float = 1e-4,
    clip: Optional[float] = None,
) -> torch.Tensor:
    """Per-sample group-relative advantages (float32 CPU tensor, shape (N,)).

    Args:
        rewards: one reward per sample (the gathered batch).
        groups: one label per sample; samples with equal labels form a group (the prompt string
            or index; groups need not be contiguous).
        std: ``"group"`` divides by each group's own std, ``"global"`` by the std of all
            ``rewards`` (both references' released configs), ``"none"`` only centres.
        eps: added to the std (1e-4 in both references).
        clip: clamp the result to ``[-clip, clip]`` (both references train with 5).

    A group whose rewards are all equal gets advantage exactly 0 (not a rounding residue), so
    :func:`nonzero_advantage_mask` finds it. NaN rewards are refused: one NaN would silently turn
    its whole group's advantages (and with ``std="global"`` the whole batch) into NaN.
    """
    if isinstance(rewards, torch.Tensor):
        r = rewards.detach().cpu().to(torch.float64).reshape(-1)
    else:
        r = torch.as_tensor(np.asarray(rewards, dtype=np.float64)).reshape(-1)
    ids = group_ids(groups)
    if ids.numel() != r.numel():
        raise ValueError(f"group_advantages: {r.numel()} rewards but {ids.numel()} group labels")
    if std not in ("group", "global", "none"):
        raise ValueError(f"group_advantages: std must be 'group', 'global' or 'none', got {std!r}")
    if bool(torch.isnan(r).any()):
        bad = torch.nonzero(torch.isnan(r)).flatten().tolist()
        raise ValueError(f"group_advantages: NaN reward at sample(s) {bad[:10]}; drop those samples or use "
                         "MultiReward(nan_policy='ignore')")
    num_groups = int(ids.max()) + 1 if ids.numel() else 0
    count = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, ids, torch.ones_like(r))
    mean = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, ids, r) / count
    centred = r - mean[ids]
    # All-equal groups: exactly zero (the float mean of equal values may differ by one ulp).
    lo = torch.full((num_groups,), float("inf"), dtype=torch.float64).scatter_reduce(0, ids, r, "amin")
    hi = torch.full((num_groups,), float("-inf"), dtype=torch.float64).scatter_reduce(0, ids, r, "amax")
    centred = torch.where((lo == hi)[ids], torch.zeros_like(centred), centred)
    if std == "group":
        var = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, ids, centred**2) / count
        adv = centred / (var.sqrt()[ids] + eps)
    elif std == "global":
        adv = centred / (r.std(unbiased=False) + eps) if r.numel() else centred
    else:
        adv = centred
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv.to(torch.float32)


def nonzero_advantage_mask(advantages: torch.Tensor) -> torch.Tensor:
    """True where a sample carries signal (``A != 0``). Flow-GRPO drops the rest: a group whose
    rewards are all equal contributes nothing but noise to the clipped surrogate."""
    return advantages != 0
