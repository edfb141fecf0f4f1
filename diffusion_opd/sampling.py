"""Flow-matching schedules and one-step transition kernels.

Conventions (as in SD3 / Flow-GRPO / DiffusionNFT): ``sigma`` runs from 1 (pure noise) to 0
(data), ``x_sigma = (1 - sigma) * x0 + sigma * eps``, the model predicts the velocity
``v = eps - x0`` and the model timestep is ``1000 * sigma``. A step goes from ``sigma`` to
``sigma_next < sigma``, so ``dt = sigma_next - sigma < 0``.

Every step of the sampler is a Gaussian kernel ``N(mean, std^2 I)`` (the paper's "Per-Step
Gaussian Transitions": the Euler-Maruyama discretisation of the reverse SDE);
``noise_level = 0`` is the Euler ODE step,
a Dirac at ``mean``. The per-step ``std`` depends only on the schedule, never on the model,
which is what makes the student-teacher KL closed-form (paper eq. 11).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from .glue import fusable

Sigma = Union[float, torch.Tensor]
Generators = Union[torch.Generator, Sequence[torch.Generator], None]

__all__ = [
    "sd3_sigmas",
    "flux_mu",
    "flux_sigmas",
    "shift_sigmas",
    "StepResult",
    "std_dev_t",
    "transition_mean_std",
    "sde_step",
    "dpm2_step",
    "gaussian_log_prob",
    "reduce_per_sample",
    "randn",
]


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The SD3 resolution shift ``s' = shift * s / (1 + (shift - 1) * s)``."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sd3_sigmas(num_steps: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The ``num_steps + 1`` sigmas (float64, last one 0) SD3 samples with.

    Equal to ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(num_steps)``'s
    ``sigmas`` (diffusers, static shifting): the scheduler spaces the *timesteps* linearly
    between its largest and smallest training sigma (both already shifted) and then applies the
    shift once more, so the smallest sigma is ``shift(shift(1 / T))`` (0.0089 for shift 3).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    train = torch.linspace(1.0, 1.0 / num_train_timesteps, num_train_timesteps, dtype=torch.float64)
    train = shift_sigmas(train, shift)
    sigma_max, sigma_min = train[0].tolist(), train[-1].tolist()  # a CPU tensor: no device to wait for
    sigmas = torch.linspace(sigma_max, sigma_min, num_steps, dtype=torch.float64)
    sigmas = shift_sigmas(sigmas, shift)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent log-shift: linear in the number of image tokens,
    ``mu = base_shift + (max_shift - base_shift) (n - base_seq_len) / (max_seq_len - base_seq_len)``
    (0.5 at 256 tokens = 256 px, 1.15 at 4096 tokens = 1024 px; 512 px: 1024 tokens, mu 0.63)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def flux_sigmas(num_steps: int, image_seq_len: Optional[int] = None, *, shift: Optional[float] = None,
                base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                max_shift: float = 1.15) -> torch.Tensor:
    """The ``num_steps + 1`` sigmas (float64, last one 0) FluxPipeline samples with.

    FluxPipeline hands the scheduler ``linspace(1, 1 / N, N)`` and, with dynamic shifting, the
    scheduler maps each sigma through the exponential time shift
    ``e^mu / (e^mu + (1 / s - 1))`` with ``mu = flux_mu(image_seq_len)`` — which is exactly the
    SD3 shift :func:`shift_sigmas` with ``shift = e^mu``. ``image_seq_len`` is the number of
    packed latent tokens, ``(H / 16) * (W / 16)``. Passing ``shift`` instead applies that static
    shift (a FLUX scheduler without dynamic shifting, or a user's choice).
    Equal to ``FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, ...)`` after
    ``set_timesteps(sigmas=linspace(1, 1 / N, N), mu=mu)`` up to its float32 rounding.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if (image_seq_len is None) == (shift is None):
        raise ValueError("pass exactly one of image_seq_len (dynamic shift) and shift (static shift)")
    if shift is None:
        if image_seq_len < 1:
            raise ValueError(f"image_seq_len must be >= 1, got {image_seq_len}")
        shift = math.exp(flux_mu(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift))
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    sigmas = shift_sigmas(torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64), shift)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


@dataclass
class StepResult:
    """One transition ``x_{t_j} -> x_{t_{j+1}}``.

    ``mean`` and ``std`` define the Gaussian kernel; ``std`` is the TRUE per-step standard
    deviation ``std_dev_t * sqrt(-dt)`` (shape broadcastable to the sample; zeros for the ODE).
    ``log_prob`` is per sample (None for the ODE, whose kernel has no density).
    """

    prev_sample: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    log_prob: Optional[torch.Tensor]


def _as_batch_tensor(value: Sigma, like: torch.Tensor) -> torch.Tensor:
    """A float or per-sample tensor -> float32 tensor broadcastable to ``like`` (B, ...).

    A float becomes a ``torch.full`` on the device: ``torch.as_tensor(float, device=cuda)`` copies
    from host memory and blocks the host until the queue drains (twice per transition)."""
    if not isinstance(value, torch.Tensor):
        return torch.full([1] * like.ndim, float(value), dtype=torch.float32, device=like.device)
    t = value.to(like.device, torch.float32)
    if t.ndim == 0:
        return t.reshape([1] * like.ndim)
    if t.ndim == 1 and t.shape[0] == like.shape[0]:
        return t.reshape(-1, *([1] * (like.ndim - 1)))
    return t  # already broadcastable; leave it alone


def std_dev_t(sigma: Sigma, sigma_next: Sigma, noise_level: float, like: torch.Tensor) -> torch.Tensor:
    """Flow-GRPO's diffusion coefficient ``eta * sqrt(sigma / (1 - sigma))``.

    At ``sigma == 1`` the fraction is infinite; like Flow-GRPO (which uses the scheduler's
    ``sigmas[1]`` there) we use ``sigma_next`` in the denominator: the first step is the only
    one that starts at 1, and its ``sigma_next`` is exactly ``sigmas[1]``.
    """
    return _std_dev(_as_batch_tensor(sigma, like), _as_batch_tensor(sigma_next, like), noise_level)


def _std_dev(s: torch.Tensor, s_next: torch.Tensor, noise_level: float) -> torch.Tensor:
    return noise_level * torch.sqrt(s / (1 - torch.where(s >= 1, s_next, s)))


def transition_mean_std(
    velocity: torch.Tensor, sample: torch.Tensor, sigma: Sigma, sigma_next: Sigma, noise_level: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and true std of the Euler-Maruyama kernel (reference: Flow-GRPO SDE step).

    With ``g = std_dev_t`` and ``dt = sigma_next - sigma``::

        mean = x (1 + g^2 dt / (2 sigma)) + v (1 + g^2 (1 - sigma) / (2 sigma)) dt
        std  = g sqrt(-dt)

    ``noise_level = 0`` gives ``mean = x + v dt`` (Euler ODE) and ``std = 0``. Computed in
    float32; differentiable in ``velocity`` (the student's gradient path).
    """
    x = sample.float()
    s = _as_batch_tensor(sigma, x)
    s_next = _as_batch_tensor(sigma_next, x)
    return _mean_std(velocity, x, s, s_next, noise_level)


@fusable
def _mean_std(velocity: torch.Tensor, x: torch.Tensor, s: torch.Tensor, s_next: torch.Tensor,
              noise_level: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`transition_mean_std` on tensors (one fused kernel when compiled)."""
    v = velocity.float()
    dt = s_next - s
    if noise_level == 0:
        return x + v * dt, torch.zeros_like(dt)
    g = _std_dev(s, s_next, noise_level)
    mean = x * (1 + g**2 / (2 * s) * dt) + v * (1 + g**2 * (1 - s) / (2 * s)) * dt
    return mean, g * torch.sqrt(-dt)


def gaussian_log_prob(
    value: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduction: str = "sum"
) -> torch.Tensor:
    """Per-sample log N(value; mean, std^2 I).

    ``reduction="sum"`` is the exact log density over all non-batch dims; ``"mean"`` averages
    the per-element terms, the scale Flow-GRPO / DiffusionNFT log (and clip ratios) with.
    """
    std = std.expand_as(mean) if std.ndim else std
    elem = -((value.float() - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return reduce_per_sample(elem, reduction)


def reduce_per_sample(elementwise: torch.Tensor, reduction: str) -> torch.Tensor:
    """Sum ("sum") or average ("mean") over every non-batch dim: one value per sample."""
    dims = tuple(range(1, elementwise.ndim))
    if reduction == "sum":
        return elementwise.sum(dim=dims)
    if reduction == "mean":
        return elementwise.mean(dim=dims)
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def randn(shape: Sequence[int], generator: Generators, device, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise; a list of generators draws each sample's slice from its own one.

    Per-sample generators are what makes a prompt's trajectory independent of which other
    prompts share its batch.
    """
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
    gen_device = generator[0].device
    noise = torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=gen_device, dtype=dtype)
                         for g in generator])
    if torch.device(device).type == "cuda" and noise.device.type == "cpu":
        # from pinned memory the copy is queued, not waited for (pageable memory would block)
        return noise.pin_memory().to(device, non_blocking=True)
    return noise.to(device)


def sde_step(
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigma: Sigma,
    sigma_next: Sigma,
    noise_level: float,
    noise: Optional[torch.Tensor] = None,
    generator: Generators = None,
    log_prob_reduction: str = "sum",
) -> StepResult:
    """One flow-matching SDE step ``x_{t_{j+1}} = mean + std * eps``.

    The Euler-Maruyama kernel of the paper, whose student-teacher KL is closed-form (eq. 11).

    Args:
        velocity: model velocity at (sample, sigma); gradients flow through ``mean``.
        sample: current state x_{t_j}, shape (B, ...).
        sigma, sigma_next: Python floats or per-sample tensors of shape (B,).
        noise_level: eta; 0 is the deterministic Euler ODE step.
        noise: optional eps (same shape as sample); drawn from ``generator`` otherwise.
        generator: one torch.Generator or one per sample (see :func:`randn`).
        log_prob_reduction: "sum" (exact density) or "mean" (peers' per-element scale).

    Returns:
        :class:`StepResult`. ``prev_sample`` has the dtype of ``sample`` and is detached from
        nothing: detach it yourself if the next state must not carry gradients (on-policy
        states are sampled, not differentiated through).
    """
    mean, std = transition_mean_std(velocity, sample, sigma, sigma_next, noise_level)
    if noise_level == 0:
        return StepResult(prev_sample=mean.to(sample.dtype), mean=mean, std=std, log_prob=None)
    if noise is None:
        noise = randn(sample.shape, generator, sample.device)
    prev = mean + std * noise.float()
    log_prob = gaussian_log_prob(prev.detach(), mean, std, reduction=log_prob_reduction)
    return StepResult(prev_sample=prev.to(sample.dtype), mean=mean, std=std, log_prob=log_prob)


def dpm2_step(sample: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float,
              prev_x0: Optional[torch.Tensor] = None, sigma_prev: Optional[float] = None) -> torch.Tensor:
    """One step of the deterministic multistep DPM-Solver++(2M) (Lu et al., 2022) on the
    flow-matching ODE, DiffusionNFT's ``dpm2`` sampler.

    Written from the solver's definition: with ``alpha = 1 - sigma`` (signal) and ``sigma``
    (noise), ``lambda = log(alpha / sigma)`` and the data prediction ``x0 = x - sigma v``, the
    exact solution of the ODE from ``sigma`` to ``sigma_next`` with ``x0`` held at ``D`` is::

        x_next = (sigma_next / sigma) (x - alpha D) + alpha_next D

    (= ``(sigma_next / sigma) x - alpha_next (e^-h - 1) D``, ``h = lambda_next - lambda``, written
    so that ``sigma = 1``, where ``lambda = -inf``, is finite). First order: ``D = x0``. Second
    order (multistep): ``D = x0 + (x0 - prev_x0) / (2 r)`` with ``r = (lambda - lambda_prev) / h``,
    the previous step's data prediction ``prev_x0`` made at ``sigma_prev``. The correction
    vanishes when the previous step started at ``sigma = 1`` (``lambda_prev = -inf``) and the
    final step to ``sigma_next = 0`` returns ``x0`` itself — as the reference runs it: its
    first and last steps are first-order DDIM, all others second order.
    """
    if not 0 <= sigma_next < sigma <= 1:
        raise ValueError(f"dpm2_step: need 0 <= sigma_next < sigma <= 1, got sigma={sigma}, sigma_next={sigma_next}")
    dtype = torch.promote_types(sample.dtype, torch.float32)  # float32, or float64 when given
    x, x0 = sample.to(dtype), x0.to(dtype)
    if sigma_next == 0:
        return x0
    d = x0
    if prev_x0 is not None and sigma_prev is not None and sigma_prev < 1 and sigma < 1:
        lam = lambda s: math.log((1 - s) / s)
        h = lam(sigma_next) - lam(sigma)
        r = (lam(sigma) - lam(sigma_prev)) / h
        d = x0 + (x0 - prev_x0.to(dtype)) / (2 * r)
    return (sigma_next / sigma) * (x - (1 - sigma) * d) + (1 - sigma_next) * d
