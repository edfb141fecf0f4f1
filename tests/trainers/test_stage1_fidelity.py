"""Stage 1 trains as the reference code runs (DiffusionNFT ``scripts/train_nft_sd3.py``, Flow-GRPO
``scripts/train_sd3.py`` and their configs), one test per point where it once did not:
CFG gradient, loss normalisation (micro-batch size, kept samples, processes), advantage std,
old-policy decay type 2, per-sample noise levels, EMA ramp, steps per round, EMA checkpoints.
(The dpm2 sampler is tested against a high-step reference solution in tests/test_sampling.py.)"""
import math
import os
import shutil
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from diffusion_opd.config import load_config
from diffusion_opd.models import build_policy
from diffusion_opd.models.base import cfg_combine
from diffusion_opd.trainers.ema import EMA, old_policy_decay
from diffusion_opd.trainers.nft import per_sample_levels
from diffusion_opd.trainers.rl import global_loss, update_scale

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NFT, GRPO = (os.path.join(ROOT, "config", f"{n}.py") for n in ("nft", "grpo"))


# -- 1. CFG: the training gradient stops at the unconditional branch ------------------------------
def test_cfg_combine_detach_uncond_gives_the_uncond_branch_no_gradient():
    out = torch.randn(4, 3, requires_grad=True)  # [v_u; v_c] of a batch of 2
    for detach, expected_uncond in ((True, 0.0), (False, 1 - 4.5)):
        out.grad = None
        cfg_combine(out, 4.5, detach_uncond=detach).sum().backward()
        assert torch.equal(out.grad[:2], torch.full((2, 3), expected_uncond))  # d/dv_u = 0, or 1 - g
        assert torch.equal(out.grad[2:], torch.full((2, 3), 4.5))  # d/dv_c = g either way


def test_policy_cfg_gradient_is_g_times_the_conditional_one(tiny_sd3_dir):
    """Through the real tiny SD3 student: under detach_uncond the gradient of a CFG velocity is
    exactly g times the conditional-only one (so the uncond branch contributes 0); ``both``
    adds (1 - g) dv_u."""
    policy = build_policy(tiny_sd3_dir)
    params = policy.trainable_parameters()
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
    x = torch.randn(2, *policy.latent_shape(64), generator=torch.Generator().manual_seed(0))
    embeds = policy.encode_prompts(["a red car", "a cat"])
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))

    def grad(g, detach):
        v = policy.velocity(x, 0.6, embeds, guidance_scale=g, detach_uncond=detach)
        return torch.cat([t.flatten() for t in torch.autograd.grad((v * weight).sum(), params)])

    cond = 4.5 * grad(1.0, False)
    # equal to float32 rounding (the CFG forward batches uncond + cond rows, the other only cond)
    assert (grad(4.5, True) - cond).norm() < 1e-5 * cond.norm()
    assert (grad(4.5, False) - cond).norm() > 0.1 * cond.norm()


def test_grpo_configs_detach_the_uncond_branch():
    for name in ("ocr", "aesthetic", "multitask", "flow_grpo_ocr"):
        assert load_config(f"{GRPO}:{name}").rl.cfg_grad == "detach_uncond"


# -- 2, 4. One update's loss is the mean over its kept samples and trained steps --------------------
def _fake_run(world=1):
    return SimpleNamespace(world=world, accelerator=None)


def _part(*keeps):
    """An update's micro-batches: (groups with a keep vector, their indices)."""
    return [(SimpleNamespace(keep=torch.tensor(k, dtype=torch.float32)), list(range(len(k)))) for k in keeps]


def test_update_scale_is_one_over_kept_samples_times_steps():
    # 8 samples in micro-batches of 4 or of 2: the same scale, so the same gradient
    assert update_scale(_fake_run(), _part([1] * 4, [1] * 4), 9) == (1 / 72, 8)
    assert update_scale(_fake_run(), _part([1] * 2, [1] * 2, [1] * 2, [1] * 2), 9) == (1 / 72, 8)
    # dropped (zero-advantage) samples leave the denominator: 3 kept of 8
    assert update_scale(_fake_run(), _part([1, 0, 0, 1], [0, 0, 1, 0]), 3) == (1 / 9, 3)
    assert update_scale(_fake_run(), _part([0, 0]), 3) == (1 / 3, 1)  # nothing kept: zero loss, no division by 0
    assert global_loss(_fake_run(), torch.tensor(0.25)) == 0.25


def test_nft_gradient_does_not_depend_on_the_micro_batch_size(tmp_path):
    """One NFT round of the tiny SD3, the same 16 samples in micro-batches of 16, 8 or 4: the
    per-sample losses are identical, so is the update's gradient (it was 4x smaller at 4)."""
    from diffusion_opd.trainers.metrics import read_metrics
    from diffusion_opd.trainers.recipes import train

    norms = []
    for batch in (16, 4):
        out = tmp_path / f"b{batch}"
        train(load_config(f"{NFT}:tiny", [f"output_dir={out}", "logging.progress=false", "train.num_rounds=1",
                                          "eval.every=0", f"train.batch_size={batch}"]))
        rows = [r for r in read_metrics(str(out)) if "grad_norm" in r]
        norms.append(rows[0]["grad_norm"])
    assert norms[0] > 0 and all(n == pytest.approx(norms[0], rel=1e-4) for n in norms), norms


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_normalise_as_one(tmp_path):
    """Real gloo, two processes keeping 3 and 1 of their 4 samples: after the gradients are
    averaged over processes, the gradient is the mean over the 4 kept samples of BOTH
    processes, as one process with all 8 samples computes it (it was each process's own mean)."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    cmd = [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "tests/trainers/normalisation_worker.py", str(tmp_path)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    grads = [torch.load(tmp_path / f"grad{r}.pt") for r in (0, 1)]
    sys.path.insert(0, os.path.join(ROOT, "tests", "trainers"))
    from normalisation_worker import KEEP, SAMPLES, one_process_gradient

    expected = one_process_gradient()
    kept = SAMPLES[KEEP.bool()]
    torch.testing.assert_close(expected, kept.mean(0))  # the mean over kept samples (and the STEPS equal steps)
    for g in grads:
        torch.testing.assert_close(g["grad"], expected)
        assert g["loss"] == pytest.approx(float((kept @ g["w"]).mean()), rel=1e-6)


# -- 3. Advantages over the global std, as both references' released configs ------------------------
@pytest.mark.parametrize("spec", [f"{NFT}:geneval", f"{NFT}:ocr", f"{GRPO}:ocr", f"{GRPO}:aesthetic",
                                  f"{GRPO}:multitask"])
def test_stage1_advantages_use_the_global_std(spec):
    assert load_config(spec).rl.advantage_std == "global"


# -- 5. DiffusionNFT's OCR recipe: old-policy decay type 2 -------------------------------------------
def test_nft_ocr_old_policy_decay_is_type_2():
    def table(name):
        rl = load_config(f"{NFT}:{name}").rl
        return [old_policy_decay(s, rl.old_decay_rate, rl.old_decay_max, rl.old_decay_delay)
                for s in (0, 74, 75, 76, 175, 208, 209, 1000)]

    assert table("ocr") == pytest.approx([0, 0, 0, 0.0075, 0.75, 0.9975, 0.999, 0.999])
    for name in ("geneval", "pickscore", "multitask"):  # type 1
        assert table(name) == pytest.approx([0, 0.074, 0.075, 0.076, 0.175, 0.208, 0.209, 0.5])


# -- 6. DiffusionNFT trains each sample on its own random 9 of the 10 noise levels -------------------
def test_per_sample_levels_cover_every_level_with_the_expected_frequency():
    n, levels, count = 4000, 10, 9
    chosen = per_sample_levels(list(range(n)), round_idx=3, num_levels=levels, count=count)
    assert chosen.shape == (n, count)
    assert all(len(set(row.tolist())) == count for row in chosen)  # distinct within a sample
    # each level is left out of a sample with probability 1/10: binomial(4000, 0.1), std 19;
    # 5 std either side
    missing = torch.tensor([n - int((chosen == lv).any(1).sum()) for lv in range(levels)])
    assert int(missing.sum()) == n  # one level left out per sample
    assert ((missing - n / levels).abs() < 5 * math.sqrt(n * 0.1 * 0.9)).all(), missing
    # the order of the passes is random too: every level appears in the first pass
    assert set(chosen[:, 0].tolist()) == set(range(levels))
    # a function of (seed, round): the same on resume, different in another round
    assert torch.equal(chosen[:5], per_sample_levels(list(range(5)), 3, levels, count))
    assert not torch.equal(chosen[:50], per_sample_levels(list(range(50)), 4, levels, count))


def test_nft_configs_sample_with_dpm2_and_per_sample_levels():
    for name in ("geneval", "ocr", "pickscore", "multitask"):
        c = load_config(f"{NFT}:{name}")
        assert (c.rl.nft_sampler, c.rl.nft_step_sampling, c.sample.noise_level) == ("dpm2", "per_sample", 0.0)
        assert (c.sample.num_steps, c.train.num_train_steps) == (10, 9)


# -- 8. EMA(0.9) with the ramp counted after the increment; evaluated and saved; steps per round -----
def test_ema_ramp_counts_the_step_just_taken():
    p = torch.nn.Parameter(torch.zeros(1))
    ema = EMA([p], 0.9, warmup=True)
    decays = []
    for value in (1.0, 2.0, 3.0):
        decays.append(ema.current_decay())
        with torch.no_grad():
            p.fill_(value)
        ema.update()
    assert decays == pytest.approx([2 / 11, 3 / 12, 4 / 13])  # updates n = 1, 2, 3
    expected = 0.0
    for d, v in zip(decays, (1.0, 2.0, 3.0)):
        expected = d * expected + (1 - d) * v
    assert ema.shadow[0].item() == pytest.approx(expected)
    for _ in range(100):
        ema.update()
    assert ema.current_decay() == 0.9


@pytest.mark.parametrize("spec", [f"{NFT}:geneval", f"{NFT}:ocr", f"{NFT}:pickscore", f"{GRPO}:ocr",
                                  f"{GRPO}:aesthetic", f"{GRPO}:multitask"])
def test_stage1_configs_evaluate_and_save_the_ema_with_the_references_eval(spec):
    c = load_config(spec)
    assert (c.train.ema_decay, c.train.ema_warmup) == (0.9, True)
    assert (c.eval.num_steps, c.eval.rewards) == (40, True)
    assert c.sample.guidance_scale == (1.0 if c.recipe == "nft" else 4.5)  # the eval CFG is the sampling one


def test_nft_optimizer_steps_per_round():
    steps = {name: load_config(f"{NFT}:{name}").rl.updates_per_round for name in ("geneval", "pickscore", "ocr")}
    assert steps == {"geneval": 1, "pickscore": 1, "ocr": 2}
    assert load_config(f"{GRPO}:ocr").rl.updates_per_round == 2
