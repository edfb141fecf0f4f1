"""Named DiffusionNFT configs (stage 1): ``--config config/nft.py:NAME`` (NAME in ``CONFIGS``).

The paper trains its GenEval teacher with DiffusionNFT (``geneval``); its baselines are multi-task
NFT (``multitask``: every prompt scored by its own task's reward) and cascade NFT (``CASCADES``:
single-task stages in sequence, each starting from the last stage's EMA student; run with
``scripts/train.py --cascade config/nft.py:cascade``).

Every value is what DiffusionNFT's released code runs (``config/nft.py`` ``sd3_geneval`` /
``sd3_ocr`` / ``sd3_pickscore`` and ``scripts/train_nft_sd3.py``): LoRA r 32 / alpha 64, AdamW 3e-4,
wd 1e-4, clip 1.0; 48 prompt groups x 24 images per round (epoch) on 8 GPUs; advantages over the
global std, clipped to 5; beta 1.0 (0.1 for OCR); KL to the base 1e-4; CFG-free; the old policy
samples 10 deterministic ``dpm2`` steps (``rl.nft_sampler``) and each sample trains on its own
random 9 of the 10 noise levels (``rl.nft_step_sampling``); the loss is the mean over samples and
levels; ONE optimizer step per round for GenEval and PickScore, two for OCR; old-policy decay
type 1 (``min(0.001 step, 0.5)``), type 2 for OCR (0 for 75 steps, then ``0.0075`` per step up
to 0.999); EMA 0.9 with the ramp, evaluated and saved (``ema/`` in each checkpoint); evaluation
on 40-step ODE samples, CFG 1. The multi-task baseline has no reference recipe: it takes the
GenEval recipe's settings with a third of the groups per task.
"""
from diffusion_opd.configs import base


def _nft(run_name):
    c = base.stage1("nft", run_name)
    c.sample.noise_level = 0.0  # deterministic sampling of the clean samples (rl.nft_sampler=dpm2)
    c.sample.guidance_scale = 1.0  # CFG-free sampling, training and evaluation
    c.train.weight_decay = 1e-4
    c.rl.advantage_std = "global"
    c.rl.advantage_clip = 5.0
    c.rl.kl_beta = 1e-4
    c.rl.nft_beta = 1.0
    c.rl.updates_per_round = 1  # gradient_step_per_epoch 1 (GenEval, PickScore)
    return c


def _tasks():
    return {name: base.reward_task(name, reward=name) for name in ("geneval", "ocr", "pickscore")}


def _single(task):
    c = _nft(f"nft_{task}")
    c.tasks = {task: _tasks()[task]}
    if task == "ocr":  # the reference's sd3_ocr
        c.rl.nft_beta = 0.1
        c.rl.updates_per_round = 2
        c.rl.old_decay_rate, c.rl.old_decay_max, c.rl.old_decay_delay = 0.0075, 0.999, 75  # decay_type 2
    return c


def geneval():
    """The paper's GenEval teacher: DiffusionNFT on GenEval prompts, GenEval reward."""
    return _single("geneval")


def ocr():
    """DiffusionNFT on OCR prompts (beta 0.1, 2 steps per round, old-policy decay type 2): a cascade stage."""
    return _single("ocr")


def pickscore():
    """DiffusionNFT on PickScore prompts, PickScore reward: a cascade stage."""
    return _single("pickscore")


def multitask():
    """The multi-task NFT baseline: one student, three tasks, each prompt scored by its own reward."""
    c = _nft("nft_multitask")
    c.tasks = _tasks()
    c.rl.groups_per_round = 2  # 3 tasks x 2 groups x 24 images per GPU: the single-task round's images
    return c


def _tiny(run_name):
    """A tiny random SD3 on the CPU with a weight-free reward (brightness of the decoded image)."""
    c = _nft(run_name)
    base.tiny_stage1(c)
    c.rl.updates_per_round = 1
    c.tasks = {"bright": base.task(tuple(base.TINY_OBJECTS[:12]), teacher="", eval_prompts=tuple(base.TINY_OBJECTS[12:]),
                                   reward="brightness")}
    return c


def tiny():
    """CI: NFT on the tiny SD3, reward = brightness; the mean reward rises within a few rounds."""
    return _tiny("tiny_nft")


def tiny_colorful():
    """CI: a second tiny task (colourfulness on sign prompts), the tiny cascade's second stage."""
    c = _tiny("tiny_nft_colorful")
    c.tasks = {"colorful": base.task(tuple(base.TINY_SIGNS[:12]), teacher="", eval_prompts=tuple(base.TINY_SIGNS[12:]),
                                     reward="colorfulness")}
    return c


def tiny_multitask():
    """CI: both tiny tasks in one student, each prompt scored by its own task's reward."""
    c = _tiny("tiny_nft_multitask")
    c.tasks = {**tiny().tasks, **tiny_colorful().tasks}
    return c


def tiny_wan_t2v():
    """CI: NFT on a tiny random Wan 2.1 text-to-video model (5 frames of 32 px: 16 x 2 x 4 x 4
    latents) on the built-in motion prompts (``video_motion``), reward = brightness scored on every
    frame and averaged per video; a video teacher that then serves an OPD video student
    (tests/trainers/test_stage1.py)."""
    return base.tiny_wan_stage1(_tiny("tiny_nft_wan_t2v"))


CONFIGS = {f.__name__: f for f in (geneval, ocr, pickscore, multitask, tiny, tiny_colorful, tiny_multitask,
                                   tiny_wan_t2v)}
# Cascade NFT: the stages run in this order, each starting from the previous stage's student.
CASCADES = {"cascade": ("geneval", "ocr", "pickscore"), "tiny_cascade": ("tiny", "tiny_colorful")}


def get_config(name="geneval"):
    if name not in CONFIGS:
        raise ValueError(f"unknown config '{name}' in config/nft.py; valid: {', '.join(CONFIGS)} "
                         f"(cascades: {', '.join(CASCADES)}, run with scripts/train.py --cascade)")
    return CONFIGS[name]()
