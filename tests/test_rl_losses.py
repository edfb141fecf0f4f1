"""rl_losses.py: NFT, Flow-GRPO and GRPO-Guard against hand-computed values, invariances and a
Monte Carlo toy of the ratio drift GRPO-Guard corrects."""
import math

import pytest
import torch

from diffusion_opd.rl_losses import (
    clipped_surrogate,
    forward_process,
    guard_ratio,
    guard_step_weight,
    importance_ratio,
    nft_branch_losses,
    nft_implicit_velocities,
    nft_loss,
    nft_reward_weight,
    train_timestep_count,
    velocity_kl,
)
from diffusion_opd.sampling import gaussian_log_prob, sd3_sigmas, transition_mean_std

# ----------------------------------------------------------------------------- DiffusionNFT
# Sample 0 (t = 0.5): x0 = [1, 1, -1, -1], eps = [0, 2, 0, 2] -> x_t = [0.5, 1.5, -0.5, 0.5];
#   v_old = 0, v_theta = [2, 0, 0, 0].
#   beta 1:   v+ = [2,0,0,0]  x0+ - x0 = [-1.5, .5, .5, 1.5]  L+ = mean sq 1.25 / mean abs 1.0  = 1.25
#             v- = [-2,0,0,0] x0- - x0 = [.5, .5, .5, 1.5]    L- = 0.75 / 0.75                   = 1.0
#   beta 0.5: v+ = [1,0,0,0]  x0+ - x0 = [-1, .5, .5, 1.5]    L+ = 0.9375 / 0.875                = 15/14
#             v- = [-1,0,0,0] x0- - x0 = [0, .5, .5, 1.5]     L- = 0.6875 / 0.625                = 1.1
# Sample 1 (t = 0.2): x0 = 0, eps = [1,-1,1,-1], v_theta = v_old = eps - x0 (the exact target):
#   x0_hat = x0 in both branches -> error 0 -> 0 / floor = 0 (no NaN).
X0 = torch.tensor([[1.0, 1.0, -1.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
EPS = torch.tensor([[0.0, 2.0, 0.0, 2.0], [1.0, -1.0, 1.0, -1.0]])
T = torch.tensor([0.5, 0.2])
V_OLD = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, -1.0, 1.0, -1.0]])
V_THETA = torch.tensor([[2.0, 0.0, 0.0, 0.0], [1.0, -1.0, 1.0, -1.0]])


def test_forward_process_closed_form():
    x_t = forward_process(X0, EPS, T)
    torch.testing.assert_close(x_t, torch.tensor([[0.5, 1.5, -0.5, 0.5], [0.2, -0.2, 0.2, -0.2]]))
    torch.testing.assert_close(forward_process(X0, EPS, 0.0), X0)
    torch.testing.assert_close(forward_process(X0, EPS, 1.0), EPS)


def test_reward_weight_maps_clipped_advantage_onto_unit_interval():
    adv = torch.tensor([-7.0, -5.0, -2.5, 0.0, 2.5, 5.0, 9.0])
    torch.testing.assert_close(nft_reward_weight(adv), torch.tensor([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]))
    torch.testing.assert_close(nft_reward_weight(adv, adv_clip_max=2.5), torch.tensor([0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="adv_clip_max"):
        nft_reward_weight(adv, adv_clip_max=0)


def test_implicit_velocities_mirror_about_old():
    v_pos, v_neg = nft_implicit_velocities(V_THETA, V_OLD, beta=0.3)
    torch.testing.assert_close(v_pos + v_neg, 2 * V_OLD)
    torch.testing.assert_close(v_pos, 0.3 * V_THETA + 0.7 * V_OLD)
    with pytest.raises(ValueError, match="beta"):
        nft_implicit_velocities(V_THETA, V_OLD, beta=0.0)


@pytest.mark.parametrize("beta, positive, negative", [(1.0, 1.25, 1.0), (0.5, 15 / 14, 1.1)])
def test_branch_losses_equal_hand_computed_values(beta, positive, negative):
    x_t = forward_process(X0, EPS, T)
    l_pos, l_neg = nft_branch_losses(V_THETA, V_OLD, x_t, X0, T, beta=beta)
    torch.testing.assert_close(l_pos, torch.tensor([positive, 0.0]))
    torch.testing.assert_close(l_neg, torch.tensor([negative, 0.0]))
    adv = torch.tensor([2.5, -9.0])  # r = 0.75, 0
    expected = 5.0 * (0.75 * positive + 0.25 * negative) / beta
    torch.testing.assert_close(nft_loss(V_THETA, V_OLD, x_t, X0, T, adv, beta=beta), torch.tensor([expected, 0.0]))


def _random_nft_batch(seed=0, shape=(6, 3, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t = torch.rand(shape[0], generator=g) * 0.9 + 0.05
    v_old = eps - x0 + 0.5 * torch.randn(shape, generator=g)
    return x0, forward_process(x0, eps, t), t, v_old


def test_extreme_advantages_keep_one_branch():
    x0, x_t, t, v_old = _random_nft_batch(1)
    v_theta = v_old + 0.1 * torch.randn_like(v_old)
    l_pos, l_neg = nft_branch_losses(v_theta, v_old, x_t, x0, t, beta=0.7)
    n = x0.shape[0]
    torch.testing.assert_close(nft_loss(v_theta, v_old, x_t, x0, t, torch.full((n,), 5.0), beta=0.7), 5 * l_pos / 0.7)
    torch.testing.assert_close(nft_loss(v_theta, v_old, x_t, x0, t, torch.full((n,), -6.0), beta=0.7), 5 * l_neg / 0.7)


def _grad(v_start, v_old, x_t, x0, t, adv, beta):
    v = v_start.clone().requires_grad_()
    nft_loss(v, v_old, x_t, x0, t, adv, beta=beta).sum().backward()
    return v.grad


def test_gradient_at_old_policy_is_beta_invariant_and_signed_by_advantage():
    x0, x_t, t, v_old = _random_nft_batch(2)
    adv = torch.tensor([4.0, 2.0, 0.0, -1.0, -3.0, -5.0])  # r = .9, .7, .5, .4, .2, 0
    g1 = _grad(v_old, v_old, x_t, x0, t, adv, beta=1.0)
    g01 = _grad(v_old, v_old, x_t, x0, t, adv, beta=0.1)
    torch.testing.assert_close(g1, g01, rtol=1e-4, atol=1e-6)  # (2r - 1) grad L, whatever beta
    assert g1[2].abs().max() == 0  # A = 0: no signal
    # Descent direction vs the sample's own velocity target (x_t - x0) / t: towards it when
    # the sample beat its group, away from it when it did not; proportional to 2r - 1.
    target = (x_t - x0) / t.reshape(-1, 1, 1, 1)
    towards = (-g1 * (target - v_old)).flatten(1).sum(1)
    assert (towards[:2] > 0).all() and (towards[3:] < 0).all()
    r = nft_reward_weight(adv)
    pos_grad = _grad(v_old, v_old, x_t, x0, t, torch.full((6,), 5.0), beta=1.0)  # r = 1
    torch.testing.assert_close(g1, (2 * r - 1).reshape(-1, 1, 1, 1) * pos_grad, rtol=1e-4, atol=1e-6)


def test_loss_scale_and_normalisation_scale_invariance():
    x0, x_t, t, v_old = _random_nft_batch(3)
    v_theta = v_old + 0.2 * torch.randn_like(v_old)
    adv = torch.linspace(-4, 4, 6)
    base = nft_loss(v_theta, v_old, x_t, x0, t, adv)
    torch.testing.assert_close(nft_loss(v_theta, v_old, x_t, x0, t, adv, loss_scale=1.0), base / 5)
    # The adaptive weighting makes each branch 1-homogeneous: scaling every tensor by c scales
    # the loss by c (an L1-like loss), not c^2.
    c = 10.0
    torch.testing.assert_close(nft_loss(c * v_theta, c * v_old, c * x_t, c * x0, t, adv), c * base, rtol=1e-4, atol=1e-5)
    # Only v_theta is trained.
    v_old.requires_grad_()
    v = v_theta.clone().requires_grad_()
    nft_loss(v, v_old, x_t, x0, t, adv).sum().backward()
    assert v.grad is not None and v_old.grad is None


def test_velocity_kl():
    a, b = V_THETA.clone().requires_grad_(), V_OLD.clone().requires_grad_()
    kl = velocity_kl(a, b)
    torch.testing.assert_close(kl, torch.tensor([1.0, 0.0]))  # mean([4, 0, 0, 0]) = 1
    torch.testing.assert_close(velocity_kl(a, b, "sum"), torch.tensor([4.0, 0.0]))
    kl.sum().backward()
    assert a.grad is not None and b.grad is None


# ----------------------------------------------------------------------------- Flow-GRPO


def test_importance_ratio_is_one_on_policy_with_score_gradient():
    log_prob = torch.tensor([-1.3, 0.2, 5.0], requires_grad=True)
    ratio = importance_ratio(log_prob, log_prob.detach().clone())
    assert ratio.tolist() == [1.0, 1.0, 1.0]
    ratio.sum().backward()
    assert log_prob.grad.tolist() == [1.0, 1.0, 1.0]  # d rho / d log pi = rho = 1


def test_clipped_surrogate_table():
    ratio = torch.tensor([0.5, 1.0, 1.5, 0.5, 1.5], requires_grad=True)
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0])
    loss = clipped_surrogate(ratio, adv, clip_range=0.2)
    # max(-A rho, -A clip(rho, 0.8, 1.2)) row by row
    torch.testing.assert_close(loss, torch.tensor([-0.5, -1.0, -1.2, 0.8, 1.5]))
    loss.sum().backward()
    # Clipped where the advantage favours the move already made: no gradient there.
    torch.testing.assert_close(ratio.grad, torch.tensor([-1.0, -1.0, 0.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="clip_range"):
        clipped_surrogate(ratio, adv, clip_range=-0.1)


def test_train_timestep_count():
    assert train_timestep_count(10, 0.99) == 9  # the reference recipe trains 9 of 10 steps
    assert train_timestep_count(10, 1.0) == 10
    assert train_timestep_count(100, 0.29) == 29  # 100 * 0.29 = 28.999999999999996 in floats
    assert train_timestep_count(3, 0.1) == 1
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="timestep_fraction"):
            train_timestep_count(10, bad)


# ----------------------------------------------------------------------------- GRPO-Guard


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_guard_log_ratio_is_the_centred_noise_term(reduction):
    """a = mu_old + s eps  =>  log rho_guard = red(eps * (mu_theta - mu_old)) exactly."""
    g = torch.Generator().manual_seed(5)
    mu_old = torch.randn(4, 2, 3, 3, generator=g)
    mu = mu_old + 0.05 * torch.randn(4, 2, 3, 3, generator=g)
    eps = torch.randn(4, 2, 3, 3, generator=g)
    s = torch.tensor([0.7, 0.3, 0.05, 0.01]).reshape(-1, 1, 1, 1)  # like StepResult.std
    a = mu_old + s * eps
    logp, logp_old = gaussian_log_prob(a, mu, s, reduction), gaussian_log_prob(a, mu_old, s, reduction)
    ratio = guard_ratio(logp, logp_old, mu, mu_old, s, reduction)
    d = mu - mu_old
    expected = eps * d
    expected = expected.flatten(1).mean(1) if reduction == "mean" else expected.flatten(1).sum(1)
    torch.testing.assert_close(torch.log(ratio), expected, atol=2e-5, rtol=1e-3)
    # The plain log ratio carries the drift -red(d^2) / (2 s^2) on top of red(eps d) / s.
    red = (d**2).flatten(1).mean(1) if reduction == "mean" else (d**2).flatten(1).sum(1)
    s1 = s.reshape(-1)
    torch.testing.assert_close(logp - logp_old, expected / s1 - red / (2 * s1**2), atol=2e-4, rtol=1e-3)
    with pytest.raises(ValueError, match="std must be > 0"):
        guard_ratio(logp, logp_old, mu, mu_old, 0.0)


def test_guard_ratio_stays_centred_where_plain_ratio_drifts():
    """Toy: the SD3 10-step schedule at eta 0.7, N = 64 elements, n = 4000 actions per step
    drawn from the old kernel, a new policy whose velocity moved by delta (|delta| = 0.2 per
    element). With per-element-mean log densities, m = mean(d^2), d = mu_theta - mu_old:

        log rho_plain ~ N(-m / (2 s^2), m / (N s^2))  ->  E rho_plain = exp(-(m / 2 s^2)(1 - 1/N))
        log rho_guard ~ N(0, m / N)                   ->  E rho_guard = exp(m / (2N))  (~ 1)

    Tolerances: 5 standard errors of the sample mean (std / sqrt(n)), from the samples."""
    n, dim, eta = 4000, 64, 0.7
    g = torch.Generator().manual_seed(0)
    sigmas = sd3_sigmas(10).tolist()
    x = torch.randn(n, dim, generator=g)
    v_old = torch.randn(n, dim, generator=g)
    delta = 0.2 * torch.sign(torch.randn(1, dim, generator=g))  # the same move for every sample
    print("\nstep  sigma    s       E rho_plain (pred)    E rho_guard (pred)")
    plain_means, guard_means = [], []
    for j in range(10):
        mu_old, s = transition_mean_std(v_old, x, sigmas[j], sigmas[j + 1], eta)
        mu, _ = transition_mean_std(v_old + delta, x, sigmas[j], sigmas[j + 1], eta)
        a = mu_old + s * torch.randn(n, dim, generator=g)
        logp, logp_old = gaussian_log_prob(a, mu, s, "mean"), gaussian_log_prob(a, mu_old, s, "mean")
        plain = importance_ratio(logp, logp_old)
        guard = guard_ratio(logp, logp_old, mu, mu_old, s)
        m, s_ = ((mu - mu_old) ** 2).mean().item(), s.item()
        pred_plain = math.exp(-m / (2 * s_**2) * (1 - 1 / dim))
        pred_guard = math.exp(m / (2 * dim))
        se_plain, se_guard = plain.std().item() / math.sqrt(n), guard.std().item() / math.sqrt(n)
        print(f"{j:>4}  {sigmas[j]:.4f}  {s_:.4f}  {plain.mean():.5f} ({pred_plain:.5f})    "
              f"{guard.mean():.7f} ({pred_guard:.7f})")
        assert abs(plain.mean().item() - pred_plain) < 5 * se_plain + 1e-6, j
        assert abs(guard.mean().item() - pred_guard) < 5 * se_guard + 1e-6, j
        assert abs(pred_guard - 1) < 1e-4  # the Guard's mean is 1 to within exp(m / 2N) - 1
        plain_means.append(plain.mean().item())
        guard_means.append(guard.mean().item())
    # High-noise steps: both at 1; the low-noise last step: plain far below 1 (>> its SE).
    assert abs(plain_means[0] - 1) < 1e-3
    assert plain_means[-1] < 0.95 and plain_means[-1] < plain_means[0] - 0.04
    assert max(abs(gm - 1) for gm in guard_means) < 1e-3


def test_guard_step_weight():
    assert guard_step_weight(-0.25) == 4.0
    torch.testing.assert_close(guard_step_weight(torch.tensor([-0.5, -0.1])), torch.tensor([2.0, 10.0]))
    with pytest.raises(ValueError, match="dt"):
        guard_step_weight(0.0)
    with pytest.raises(ValueError, match="dt"):
        guard_step_weight(torch.tensor([-0.1, 0.1]))
