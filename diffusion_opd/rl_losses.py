"""Stage-1 RL losses as pure functions: DiffusionNFT, Flow-GRPO and GRPO-Guard.

Conventions as in :mod:`diffusion_opd.sampling`: ``t`` (= sigma) runs from 1 (noise) to 0
(data), ``x_t = (1 - t) x0 + t eps``, the model predicts ``v = eps - x0``, a sampler step has
``dt = sigma_next - sigma < 0`` and the TRUE per-step std ``s = std_dev_t * sqrt(-dt)``.
Every loss returns one value per sample (shape (B,)); the recipe averages.

* DiffusionNFT trains on the forward process of clean samples: no log-probabilities, any
  sampler. :func:`nft_loss` is the +-branch loss with its per-sample normalisation.
* Flow-GRPO is PPO on the SDE sampler's Gaussian steps: :func:`importance_ratio` ->
  :func:`clipped_surrogate`. Its KL to the base model is the same closed-form Gaussian-step KL
  the OPD loss uses: :func:`diffusion_opd.losses.opd_kl` with the base model's mean in place of
  the teacher's (``released_code_dt=dt`` reproduces Flow-GRPO's denominator).
* GRPO-Guard replaces the ratio by :func:`guard_ratio` and weights each step's loss by
  :func:`guard_step_weight`.
"""
from __future__ import annotations

import math
from typing import Union

import torch

from .sampling import reduce_per_sample

Scalar = Union[float, torch.Tensor]

__all__ = [
    "forward_process",
    "nft_reward_weight",
    "nft_implicit_velocities",
    "nft_branch_losses",
    "nft_loss",
    "velocity_kl",
    "importance_ratio",
    "clipped_surrogate",
    "guard_ratio",
    "guard_step_weight",
    "train_timestep_count",
]


def _per_sample(value: Scalar, like: torch.Tensor) -> torch.Tensor:
    """A float or a (B,) tensor -> float32 tensor broadcastable to ``like`` (B, ...)."""
    t = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if t.ndim == 1 and like.ndim > 1:
        t = t.reshape(-1, *([1] * (like.ndim - 1)))
    return t


# --------------------------------------------------------------------------- DiffusionNFT


def forward_process(x0: torch.Tensor, noise: torch.Tensor, t: Scalar) -> torch.Tensor:
    """The flow-matching forward process ``x_t = (1 - t) x0 + t eps`` (``t`` a float or (B,))."""
    tt = _per_sample(t, x0)
    return (1 - tt) * x0.float() + tt * noise.float()


def nft_reward_weight(advantages: torch.Tensor, adv_clip_max: float = 5.0) -> torch.Tensor:
    """DiffusionNFT's optimality weight ``r = clamp(A / (2 A_max) + 1/2, 0, 1)``.

    The advantage is clipped to ``[-A_max, A_max]`` (reference: 5) and mapped linearly onto
    [0, 1]: ``A = 0`` gives 1/2 (both branches equally), ``A >= A_max`` gives 1 (only the
    positive branch), ``A <= -A_max`` gives 0 (only the negative branch). With the reference
    value this is ``clamp(A / 10 + 0.5, 0, 1)``.
    """
    if adv_clip_max <= 0:
        raise ValueError(f"nft_reward_weight: adv_clip_max must be > 0, got {adv_clip_max}")
    return (advantages.float() / (2 * adv_clip_max) + 0.5).clamp(0.0, 1.0)


def nft_implicit_velocities(
    v_theta: torch.Tensor, v_old: torch.Tensor, beta: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The implicit positive and negative policies of DiffusionNFT::

        v+ = beta v_theta + (1 - beta) v_old
        v- = (1 + beta) v_old - beta v_theta

    ``v+`` and ``v-`` are mirror images about ``v_old`` (``v+ + v- = 2 v_old``). ``v_old`` (the
    sampling policy) is detached; gradients flow through ``v_theta`` only.
    """
    if beta <= 0:
        raise ValueError(f"nft: beta must be > 0, got {beta}")
    v, old = v_theta.float(), v_old.detach().float()
    return beta * v + (1 - beta) * old, (1 + beta) * old - beta * v


def _normalised_x0_error(x0_hat: torch.Tensor, x0: torch.Tensor, floor: float) -> torch.Tensor:
    """``mean((x0_hat - x0)^2) / stopgrad(mean|x0_hat - x0|)`` per sample (adaptive weighting)."""
    err = x0_hat - x0
    with torch.no_grad():
        scale = reduce_per_sample(err.abs().double(), "mean").clamp_min(floor).to(err.dtype)
    return reduce_per_sample(err**2, "mean") / scale


def nft_branch_losses(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    t: Scalar,
    beta: float = 1.0,
    norm_floor: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The positive and negative branch losses ``(L+, L-)`` of DiffusionNFT, each (B,).

    For each implicit velocity ``v`` (:func:`nft_implicit_velocities`) the predicted clean sample
    is ``x0_hat = x_t - t v``, and the branch loss is its mean squared error to ``x0`` divided
    by its own DETACHED mean absolute error (per sample, floored at ``norm_floor``)::

        L = mean((x0_hat - x0)^2) / stopgrad(mean|x0_hat - x0|)

    so every sample's loss is O(|error|) whatever its noise level and content (the gradient
    has the scale of a normalised L1 loss).
    """
    v_pos, v_neg = nft_implicit_velocities(v_theta, v_old, beta)
    tt, xt, target = _per_sample(t, x_t), x_t.float(), x0.float()
    positive = _normalised_x0_error(xt - tt * v_pos, target, norm_floor)
    negative = _normalised_x0_error(xt - tt * v_neg, target, norm_floor)
    return positive, negative


def nft_loss(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    t: Scalar,
    advantages: torch.Tensor,
    beta: float = 1.0,
    adv_clip_max: float = 5.0,
    loss_scale: float = 5.0,
    norm_floor: float = 1e-5,
) -> torch.Tensor:
    """DiffusionNFT's per-sample policy loss::

        loss = loss_scale * (r L+ / beta + (1 - r) L- / beta),   r = nft_reward_weight(A)

    ``loss_scale``: the reference multiplies by its ``adv_clip_max`` (5) so that its learning
    rate applies unchanged; it is a constant factor, not part of the objective.

    At ``v_theta == v_old`` both branches coincide and the gradient w.r.t. ``v_theta`` is
    ``loss_scale * (2r - 1) * grad L`` whatever ``beta``: samples better than their group
    (``r > 1/2``) pull the velocity towards their own target ``(x_t - x0) / t``, worse ones push
    it away, average ones (``A = 0``) do nothing.

    The optional KL to the base model is :func:`velocity_kl` (reference weight 1e-4), added by
    the recipe.
    """
    r = nft_reward_weight(advantages, adv_clip_max).to(v_theta.device)
    positive, negative = nft_branch_losses(v_theta, v_old, x_t, x0, t, beta, norm_floor)
    return loss_scale * (r * positive + (1 - r) * negative) / beta


def velocity_kl(v_theta: torch.Tensor, v_ref: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """DiffusionNFT's KL-to-base term: ``||v_theta - v_ref||^2`` per sample (``v_ref`` detached).

    For two flow policies sharing ``x_t`` and ``t`` this is, up to a ``t``-dependent factor, the
    KL between their one-step Gaussian kernels (their means differ by a multiple of
    ``v_theta - v_ref``); the reference averages over elements (``reduction="mean"``).
    """
    return reduce_per_sample((v_theta.float() - v_ref.detach().float()) ** 2, reduction)


# --------------------------------------------------------------------------- Flow-GRPO


def importance_ratio(log_prob: torch.Tensor, old_log_prob: torch.Tensor) -> torch.Tensor:
    """PPO's ``rho = exp(log pi_theta(a) - log pi_old(a))`` per sample (``old_log_prob`` detached).

    Exactly 1 in value when the policy has not moved (the first inner step of an epoch) while
    still carrying ``grad log pi_theta``.
    """
    return torch.exp(log_prob.float() - old_log_prob.detach().float())


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, clip_range: float = 1e-4) -> torch.Tensor:
    """PPO's clipped surrogate loss per sample (to minimise)::

        loss = max(-A rho, -A clip(rho, 1 - eps, 1 + eps))

    ``eps = 1e-4`` in Flow-GRPO, whose ratios are of per-element-AVERAGED log densities (hence
    close to 1): compute the log-probs with ``sde_step(..., log_prob_reduction="mean")`` for that
    clip range (the default "sum" gives ratios of exact densities, far wider). Outside the trust
    region in the direction the advantage favours, the loss is constant and the sample stops
    contributing gradient.
    """
    if clip_range < 0:
        raise ValueError(f"clipped_surrogate: clip_range must be >= 0, got {clip_range}")
    adv = advantages.to(ratio.device, torch.float32)
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range))


# --------------------------------------------------------------------------- GRPO-Guard


def guard_ratio(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    mean: torch.Tensor,
    old_mean: torch.Tensor,
    std: Scalar,
    reduction: str = "mean",
) -> torch.Tensor:
    """GRPO-Guard's normalised importance ratio per sample::

        rho = exp((log pi_theta(a) - log pi_old(a) + red((mu_theta - mu_old)^2) / (2 s^2)) * s)

    ``s`` is the TRUE per-step std ``std_dev_t * sqrt(-dt)``; ``reduction`` must be the one the
    log-probabilities were computed with (``"mean"``: averaged over C, H, W, as Flow-GRPO and
    GRPO-Guard do and :func:`~diffusion_opd.sampling.sde_step` with
    ``log_prob_reduction="mean"`` returns; ``"sum"``: exact densities).

    Why: the action was drawn from the old kernel, ``a = mu_old + s eps``. With
    ``d = mu_theta - mu_old`` the per-element log ratio is exactly
    ``eps d / s - d^2 / (2 s^2)``, so::

        log rho_plain = red(eps d) / s - red(d^2) / (2 s^2)

    Its mean is ``-red(d^2) / (2 s^2) < 0``, largest where ``s`` is small (low-noise steps):
    the plain ratio drifts below 1 there and the clip mostly fires on one side. Adding the
    second term back and multiplying by ``s`` leaves ``log rho = red(eps d)``: mean 0 at every
    step, and a spread (``|d| ~ |dt|``) no longer inflated by ``1 / s``. ``old_mean`` and
    ``old_log_prob`` are detached.
    """
    d2 = (mean.float() - old_mean.detach().float()) ** 2
    s = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    s = s.reshape(-1) if s.ndim else s  # one std per sample (or one for all)
    if bool((s <= 0).any()):
        raise ValueError("guard_ratio: std must be > 0 (the ODE step has no log-probability)")
    log_ratio = log_prob.float() - old_log_prob.detach().float()
    return torch.exp((log_ratio + reduce_per_sample(d2, reduction) / (2 * s**2)) * s)


def guard_step_weight(dt: Scalar) -> Scalar:
    """GRPO-Guard's per-step loss weight ``1 / (-dt)``.

    The gradient of ``log rho_guard = red(eps d)`` w.r.t. the velocity is proportional to
    ``|dt|`` (``mu`` moves by ``c v dt``); dividing by ``-dt`` gives every step's gradient the
    same scale, so the many small late steps are not drowned by the early large ones.
    """
    if isinstance(dt, torch.Tensor):
        if bool((dt >= 0).any()):
            raise ValueError("guard_step_weight: dt = sigma_next - sigma must be < 0")
        return 1.0 / (-dt)
    if dt >= 0:
        raise ValueError(f"guard_step_weight: dt = sigma_next - sigma must be < 0, got {dt}")
    return 1.0 / (-dt)


def train_timestep_count(num_steps: int, timestep_fraction: float) -> int:
    """How many of a trajectory's ``num_steps`` steps are trained: ``floor(num_steps * fraction)``
    (Flow-GRPO; 9 of 10 at the reference 0.99), at least 1.

    A ``1e-9`` guard keeps float error from losing a step (``100 * 0.29 = 28.999999999999996``).
    """
    if not 0 < timestep_fraction <= 1:
        raise ValueError(f"timestep_fraction must be in (0, 1], got {timestep_fraction}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return max(1, math.floor(num_steps * timestep_fraction + 1e-9))
