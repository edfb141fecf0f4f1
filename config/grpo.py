"""Named Flow-GRPO / GRPO-Guard configs (stage 1): ``--config config/grpo.py:NAME``.

The paper trains its OCR and aesthetic teachers with GRPO-Guard (``ocr``, ``aesthetic``) and
compares with multi-task GRPO-Guard (``multitask``: every prompt scored by its own task's
reward). ``flow_grpo_ocr`` is plain Flow-GRPO (no ratio normalisation).

What Flow-GRPO's released code runs (``config/grpo.py`` ``general_ocr_sd3`` / ``pickscore_sd3``,
``scripts/train_sd3.py``), and so do these: SDE rollouts with eta 0.7, 10 steps, CFG 4.5 whose
training gradient stops at the unconditional branch (``rl.cfg_grad=detach_uncond``); the first 9
steps trained (timestep fraction 0.99); advantages over the GLOBAL std (``global_std=True``; the
paper's formula is per group: ``rl.advantage_std=group``); PPO clip 1e-4 on ratios of
per-element averaged log-densities; KL to the base 0.04 (0.01 for PickScore); zero-advantage
samples dropped and the loss averaged over the kept ones; 2 optimizer steps per round; 48 prompt
groups x 24 images per round on 8 GPUs; EMA 0.9 with the ramp, evaluated and saved; evaluation
on 40-step ODE samples at CFG 4.5.

GRPO-Guard has no official code. What each of its values here rests on:

- the normalised ratio ``exp((log rho + ||mu - mu_old||^2 / (2 s^2)) s)``: the paper's formula;
- the ``1 / (-dt)`` step weight (``rl_losses.guard_step_weight``): the paper's reweighting; one
  third-party implementation applies it, the other does not;
- the clip range 1e-4: Flow-GRPO's value, kept as no GRPO-Guard value is published (one
  third-party example uses 2e-6);
- KL 0.04 (0.01 aesthetic): Flow-GRPO's values, kept; the paper only says "without heavy KL";
- everything else: Flow-GRPO's values above.
"""
from diffusion_opd.configs import base


def _grpo(run_name, guard=True):
    c = base.stage1("grpo", run_name)
    c.sample.noise_level = 0.7
    c.sample.guidance_scale = 4.5
    c.rl.advantage_std = "global"
    c.rl.cfg_grad = "detach_uncond"
    c.rl.drop_zero_advantage = True
    c.rl.clip_range = 1e-4
    c.rl.kl_beta = 0.04
    c.rl.guard = guard
    return c


def _tasks():
    return {"ocr": base.reward_task("ocr", reward="ocr"), "aesthetic": base.reward_task("pickscore", reward="pickscore"),
            "geneval": base.reward_task("geneval", reward="geneval")}


def ocr():
    """The paper's OCR teacher: GRPO-Guard on OCR prompts, OCR reward."""
    c = _grpo("grpo_guard_ocr")
    c.tasks = {"ocr": _tasks()["ocr"]}
    return c


def aesthetic():
    """The paper's aesthetic teacher: GRPO-Guard on PickScore prompts, PickScore reward, KL 0.01."""
    c = _grpo("grpo_guard_aesthetic")
    c.tasks = {"aesthetic": _tasks()["aesthetic"]}
    c.rl.kl_beta = 0.01
    return c


def flow_grpo_ocr():
    """Plain Flow-GRPO on OCR (the ablation GRPO-Guard fixes)."""
    c = _grpo("flow_grpo_ocr", guard=False)
    c.tasks = {"ocr": _tasks()["ocr"]}
    return c


def multitask():
    """The multi-task GRPO-Guard baseline: three tasks, each prompt scored by its own reward."""
    c = _grpo("grpo_guard_multitask")
    c.tasks = _tasks()
    c.rl.groups_per_round = 2  # 3 tasks x 2 groups x 24 images per GPU
    return c


def _tiny(run_name, guard):
    """A tiny random SD3 on the CPU with a weight-free reward (brightness of the decoded image)."""
    c = _grpo(run_name, guard)
    base.tiny_stage1(c)
    c.sample.guidance_scale = 2.0
    c.rl.updates_per_round = 2
    c.rl.clip_range = 0.2  # tiny LoRA, large steps: a wider trust region than the 1e-4 of 512 px images
    c.tasks = {"bright": base.task(tuple(base.TINY_OBJECTS[:12]), teacher="", eval_prompts=tuple(base.TINY_OBJECTS[12:]),
                                   reward="brightness")}
    return c


def tiny_grpo():
    """CI: plain Flow-GRPO on the tiny SD3, reward = brightness."""
    return _tiny("tiny_grpo", guard=False)


def tiny_guard():
    """CI: GRPO-Guard on the tiny SD3, reward = brightness."""
    return _tiny("tiny_guard", guard=True)


def tiny_wan_t2v():
    """CI: plain Flow-GRPO on a tiny random Wan 2.1 text-to-video model (5 frames of 32 px:
    16 x 2 x 4 x 4 latents; SDE rollouts, the per-step Gaussians over the whole video latent) on
    the built-in motion prompts (``video_motion``), reward = brightness scored on every frame and
    averaged per video; config/nft.py's ``tiny_wan_t2v`` with GRPO."""
    return base.tiny_wan_stage1(_tiny("tiny_grpo_wan_t2v", guard=False))


CONFIGS = {f.__name__: f for f in (ocr, aesthetic, flow_grpo_ocr, multitask, tiny_grpo, tiny_guard, tiny_wan_t2v)}


def get_config(name="ocr"):
    if name not in CONFIGS:
        raise ValueError(f"unknown config '{name}' in config/grpo.py; valid: {', '.join(CONFIGS)}")
    return CONFIGS[name]()
