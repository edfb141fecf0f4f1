"""The demo's configs (``make demo``): the toy model, its three tasks, every run of the pipeline.

``--config config/demo.py:NAME`` with NAME in ``CONFIGS``. They are the real trainers' configs:
only the model (``diffusion_opd/models/toy.py``), the prompts and the rewards are the toy's.
Paths point under ``outputs/demo`` where ``scripts/demo.py`` writes the base model and the
teachers; ``scripts/demo.py --quick`` shortens every run (``QUICK`` below).
"""
import importlib.util
import os

from diffusion_opd.demo.world import TASKS

_spec = importlib.util.spec_from_file_location("_demo_base", os.path.join(os.path.dirname(__file__), "base.py"))
base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(base)

ROOT = "outputs/demo"
GUIDANCE = 3.0  # CFG of every policy in the demo (student, teachers, baselines, evaluation)


def toy_base(name):
    """What every demo run shares: the pretrained toy model on the CPU, ODE sampling, 10 steps."""
    c = base.get_config()
    c.run_name = name
    c.output_dir = f"{ROOT}/runs/{name}"
    c.device = "cpu"
    c.cpu_threads = 1  # tiny matrices: threads cost more than they give
    c.model.path = f"{ROOT}/base"
    c.lora.rank = 16
    c.lora.alpha = 32
    c.lora.target_modules = ("cond_proj", "in_proj", "mod", "fc1", "fc2", "out_proj")
    c.sample.num_steps = 10
    c.sample.noise_level = 0.0
    c.sample.guidance_scale = GUIDANCE
    c.sample.resolution = 16  # 8x8 pixels shown at 16 px (models/toy.py)
    c.sample.shift = 1.0
    c.train.ema_decay = 0.0
    c.train.weight_decay = 0.0
    c.save_every = 10  # the demo's convergence curves evaluate every checkpoint
    c.keep_last = 1000
    c.eval.every = 0  # the demo evaluates checkpoints itself (same evaluation for every method)
    c.logging.progress = True
    return c


def _tasks(names=tuple(TASKS)):
    return {t: base.task(tuple(TASKS[t][1]), teacher=t, reward=TASKS[t][0]) for t in names}


def _teachers(names=tuple(TASKS)):
    return {t: base.teacher(f"{ROOT}/teachers/{t}", guidance_scale=GUIDANCE) for t in names}


def opd():
    """Stage 2, the released recipe on the toy: ODE rollouts, per-step L2 (eq. 12), one optimizer
    step per round over the three tasks, 9 of 10 steps trained."""
    c = toy_base("opd")
    c.teachers = _teachers()
    c.tasks = _tasks()
    c.train.batch_size = 8
    c.train.num_train_steps = 9
    c.train.num_rounds = 100
    c.train.learning_rate = 5e-3
    return c


def opd_sde():
    """OPD with SDE rollouts (noise level 0.7) and the closed-form KL of eq. 11."""
    c = opd()
    c.run_name, c.output_dir = "opd_sde", f"{ROOT}/runs/opd_sde"
    c.sample.noise_level = 0.7
    c.train.loss = "kl"
    return c


def opd_ppo():
    """The ablation: the same SDE OPD trained with the PPO-style surrogate (KL as a dense reward)."""
    c = opd_sde()
    c.run_name, c.output_dir = "opd_ppo", f"{ROOT}/runs/opd_ppo"
    c.train.loss = "ppo"
    return c


CONFIGS = {f.__name__: f for f in (opd, opd_sde, opd_ppo)}
# The shortened run (scripts/demo.py --quick, the test suite): rounds per config, checkpoint spacing.
QUICK = {"opd": 12, "opd_sde": 12, "opd_ppo": 12}
QUICK_SAVE_EVERY = 4


def get_config(name="opd"):
    if name not in CONFIGS:
        raise ValueError(f"unknown config '{name}' in config/demo.py; valid: {', '.join(CONFIGS)}")
    return CONFIGS[name]()
