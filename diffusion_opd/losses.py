"""OPD losses as pure functions of the student's and teacher's one-step transition means.

All functions return one value per sample (shape (B,)); the trainer averages. ``std`` is the
TRUE per-step standard deviation ``s_j = std_dev_t * sqrt(-dt)`` returned by
:func:`diffusion_opd.sampling.sde_step` (a float or a tensor broadcastable to the means).

Reductions over the non-batch dims:
* ``"sum"``: the exact KL / squared norm of the paper's equations;
* ``"mean"``: divided by the number of elements (C*H*W), the scale Flow-GRPO, DiffusionNFT and
  the released DiffusionOPD code train with (keeps the loss O(1) whatever the resolution).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from .glue import fusable
from .sampling import gaussian_log_prob, reduce_per_sample

Std = Union[float, torch.Tensor]

__all__ = ["opd_kl", "opd_l2", "opd_ppo_surrogate"]


def _as_tensor(std: Std, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(std, torch.Tensor):  # torch.full: no blocking host-to-device copy
        return torch.full((), float(std), dtype=torch.float32, device=like.device)
    t = std.to(like.device, torch.float32)
    if t.ndim == 1 and t.shape[0] == like.shape[0] and like.ndim > 1:
        t = t.reshape(-1, *([1] * (like.ndim - 1)))  # per-sample std
    return t


def opd_kl(
    mean_student: torch.Tensor,
    mean_teacher: torch.Tensor,
    std: Std,
    reduction: str = "mean",
    released_code_dt: Optional[Std] = None,
    check_std: bool = True,
) -> torch.Tensor:
    """Closed-form per-step reverse KL between the student's and the teacher's Gaussian kernels.

    Paper eq. (11): ``KL(N(mu_S, s^2 I) || N(mu_T, s^2 I)) = ||mu_S - mu_T||^2 / (2 s^2)``;
    both kernels share ``s``, which depends only on the schedule. Gradients flow through
    ``mean_student``; ``mean_teacher`` is treated as a constant (detached).

    ``released_code_dt``: pass the step's ``dt`` (or ``-dt``; the sign is ignored) to divide
    by ``std_dev_t^2 = s^2 / |dt|`` instead of ``s^2``, i.e. reproduce the released
    DiffusionOPD code and Flow-GRPO's KL term, which omit the ``-dt`` factor of the variance.
    The result is the true KL times ``|dt|``: a per-step reweighting, not a different optimum.

    Raises ValueError when ``std`` is zero (the ODE has no density): use :func:`opd_l2`.
    ``check_std=False`` skips that check: it reads ``std`` on the host, which on an accelerator
    blocks until the queue drains; the trainer skips it (its config check refuses the KL with
    ODE rollouts, and an SDE step's std is > 0).
    """
    s = _as_tensor(std, mean_student)
    if check_std and bool((s == 0).any()):
        raise ValueError(
            "opd_kl: std is 0 (noise_level 0 = deterministic ODE step): the KL is undefined; "
            "use opd_l2 (paper eq. 12) for ODE rollouts"
        )
    dt = None if released_code_dt is None else _as_tensor(released_code_dt, mean_student)
    return _kl(mean_student, mean_teacher.detach(), s, dt, reduction)


@fusable
def _kl(mean_student, mean_teacher, s, dt, reduction: str) -> torch.Tensor:
    variance = s**2 if dt is None else s**2 / dt.abs()
    diff2 = (mean_student.float() - mean_teacher.float()) ** 2
    return reduce_per_sample(diff2 / (2 * variance), reduction)


def opd_l2(mean_student: torch.Tensor, mean_teacher: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """ODE transition matching, paper eq. (12): ``0.5 ||mu_S - mu_T||^2``.

    The deterministic limit of :func:`opd_kl` up to the (constant) ``1 / s^2`` factor.
    ``mean_teacher`` is detached.
    """
    return _l2(mean_student, mean_teacher.detach(), reduction)


@fusable
def _l2(mean_student, mean_teacher, reduction: str) -> torch.Tensor:
    diff2 = (mean_student.float() - mean_teacher.float()) ** 2
    return 0.5 * reduce_per_sample(diff2, reduction)


def opd_ppo_surrogate(
    mean_student: torch.Tensor,
    mean_teacher: torch.Tensor,
    std: Std,
    action: torch.Tensor,
    reduction: str = "sum",
) -> torch.Tensor:
    """PPO-style surrogate with the per-step KL as a dense cost (the paper's "Closed-Form KL vs. PPO-Style Policy Gradient").

    ``L = rho(theta) * Delta(theta)`` with ``Delta = opd_kl(...)`` and the importance ratio
    ``rho = exp(log pi_theta(a) - stopgrad(log pi_theta(a)))`` (= 1 in value: on-policy, a
    single gradient step per rollout). Its gradient is the paper's decomposition::

        grad(rho * Delta) = grad Delta                       (pathwise term)
                          + Delta * grad log pi_theta(a)     (score-function term)

    For the Gaussian kernel ``a = mu_S + s eps`` the score term is ``Delta * (eps / s) * grad mu_S``:
    zero in expectation (``Delta`` does not depend on ``a``), pure added variance. The value
    equals ``Delta``; only the gradient differs from :func:`opd_kl`.

    ``action`` is the sampled next state (detached inside). The log density is always the exact
    one (sum over dims) so that the score term is unbiased; ``reduction`` applies to ``Delta``.
    """
    s = _as_tensor(std, mean_student)
    delta = opd_kl(mean_student, mean_teacher, s, reduction=reduction)
    log_prob = gaussian_log_prob(action.detach(), mean_student.float(), s, reduction="sum")
    ratio = torch.exp(log_prob - log_prob.detach())
    return ratio * delta
