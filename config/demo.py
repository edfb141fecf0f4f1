"""The demo's configs (``make demo``): the toy model, its three tasks, every run of the pipeline.

``--config config/demo.py:NAME`` with NAME in ``CONFIGS``. They are the real trainers' configs:
only the model (``diffusion_opd/models/toy.py``), the prompts and the rewards are the toy's.
Paths point under ``outputs/demo`` where ``scripts/demo.py`` writes the base model and the
teachers; ``scripts/demo.py --quick`` shortens every run (``QUICK`` below).
"""
from diffusion_opd.configs import base
from diffusion_opd.data.toy_world import TASKS

ROOT = "outputs/demo"
# Every model of the demo samples CFG-free, as DiffusionNFT trains (its training forwards are
# conditional only): one guidance for base, teachers, students and baselines keeps the table's
# rows comparable. CFG > 1 works too (the OPD trainer batches it, as for SD3.5).
GUIDANCE = 1.0


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
    c.train.batch_size = 12
    c.train.num_train_steps = 9
    # 600 rounds with a cosine decay of the step size: at a constant 1e-2 the colour task (the
    # slowest: it moves whole objects from one colour mode to another) was still rising at round
    # 300, then oscillated between 0.683 and 0.704 over rounds 350-600; the decay lets it settle.
    c.train.num_rounds = 600
    c.train.learning_rate = 1e-2
    c.train.lr_schedule = "cosine"
    return c


def opd_sde():
    """OPD with SDE rollouts (noise level 0.7) and the closed-form KL of eq. 11."""
    c = opd()
    c.run_name, c.output_dir = "opd_sde", f"{ROOT}/runs/opd_sde"
    c.sample.noise_level = 0.7
    c.train.loss = "kl"
    c.train.num_rounds = 100  # the two SDE ablations run a sixth of opd's rounds (the demo's time budget)
    # ... at a constant step: 100 rounds end far below the plateau, where a decay would only cut
    # their progress (measured: the closed-form student's colour reward 0.615 constant, 0.549 cosine)
    c.train.lr_schedule = "constant"
    return c


def opd_ppo():
    """The ablation: the same SDE OPD trained with the PPO-style surrogate (KL as a dense reward)."""
    c = opd_sde()
    c.run_name, c.output_dir = "opd_ppo", f"{ROOT}/runs/opd_ppo"
    c.train.loss = "ppo"
    return c


def _rl(name, recipe, tasks):
    """Stage 1 on the toy: ``rl.group_size`` images per prompt, each prompt scored by its own
    task's reward, group-relative advantages (trainers/rl.py)."""
    c = toy_base(name)
    c.recipe = recipe
    c.tasks = {t: base.task(tuple(TASKS[t][1]), teacher="", reward=TASKS[t][0]) for t in tasks}
    c.train.batch_size = 16  # training micro-batch (samples)
    c.train.num_train_steps = 9
    c.train.num_rounds = 60
    c.rl.group_size = 8
    c.rl.groups_per_round = 4  # 32 images per task per round
    c.rl.updates_per_round = 2
    # the EMA both references evaluate and save: teachers are exported and baselines scored from it
    c.train.ema_decay = 0.9
    c.train.ema_warmup = True
    return c


def _nft(name, tasks):
    """DiffusionNFT: CFG-free deterministic sampling (dpm2) by the old policy, forward-process
    training on per-sample random noise levels, advantages over the global std (the library's
    reference defaults; KL to the base off on the toy)."""
    c = _rl(name, "nft", tasks)
    c.train.learning_rate = 3e-3
    c.rl.old_decay_rate = 0.01  # the old policy follows the student faster on a 40-round run
    return c


def _guard(name, tasks):
    """GRPO-Guard: SDE rollouts (noise level 0.7), clipped ratio with the normalised ratio and the
    1/(-dt) step weights, advantages over the global std, zero-advantage groups dropped (the loss
    averaged over the kept samples)."""
    c = _rl(name, "grpo", tasks)
    c.sample.noise_level = 0.7
    c.train.learning_rate = 3e-3
    c.rl.drop_zero_advantage = True
    c.rl.guard = True
    return c


def teacher_colour():
    """The colour teacher (the paper's GenEval teacher): DiffusionNFT on the colour prompts."""
    return _nft("teacher_colour", ["colour"])


def teacher_glyph():
    """The glyph teacher (the paper's OCR teacher): GRPO-Guard on the sign prompts."""
    return _guard("teacher_glyph", ["glyph"])


def teacher_aesthetic():
    """The aesthetic teacher: GRPO-Guard on the style prompts."""
    return _guard("teacher_aesthetic", ["aesthetic"])


def multitask():
    """Baseline: multi-task NFT, one student on all three tasks (each prompt scored by its own
    reward); the demo sets its rounds to the OPD pipeline's training images."""
    return _nft("multitask", list(TASKS))


def multitask_guard():
    """Baseline: multi-task GRPO-Guard (the paper's other multi-task baseline), one student on all
    three tasks, each prompt scored by its own reward; rounds set to the OPD pipeline's images."""
    return _guard("multitask_guard", list(TASKS))


def cascade_colour():
    """Baseline, cascade NFT stage 1 of 3 (the demo chains the stages with model.student_init)."""
    return _nft("cascade_colour", ["colour"])


def cascade_glyph():
    """Cascade NFT stage 2 of 3: the glyph task, from stage 1's student."""
    return _nft("cascade_glyph", ["glyph"])


def cascade_aesthetic():
    """Cascade NFT stage 3 of 3: the aesthetic task, from stage 2's student."""
    return _nft("cascade_aesthetic", ["aesthetic"])


CASCADES = {"cascade": ("cascade_colour", "cascade_glyph", "cascade_aesthetic")}
CONFIGS = {f.__name__: f for f in (teacher_colour, teacher_glyph, teacher_aesthetic, opd, opd_sde, opd_ppo, multitask,
                                    multitask_guard, cascade_colour, cascade_glyph, cascade_aesthetic)}
# The shortened run (scripts/demo.py --quick, the test suite): rounds per config, checkpoint spacing.
QUICK = {"teacher_colour": 16, "teacher_glyph": 16, "teacher_aesthetic": 16, "opd": 32, "opd_sde": 6, "opd_ppo": 6,
         "multitask": 8, "multitask_guard": 8, "cascade_colour": 8, "cascade_glyph": 8, "cascade_aesthetic": 8}
QUICK_SAVE_EVERY = 4


def get_config(name="opd"):
    if name not in CONFIGS:
        raise ValueError(f"unknown config '{name}' in config/demo.py; valid: {', '.join(CONFIGS)}")
    return CONFIGS[name]()
