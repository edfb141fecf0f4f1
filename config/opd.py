"""Named OPD configs: ``--config config/opd.py:NAME`` (NAME in ``CONFIGS``).

Each function starts from the schema (diffusion_opd/configs/base.py) and states only what
differs, so a config reads as the recipe. Derived quantities (images per round, forwards per
round...) are printed at start.
"""
from diffusion_opd.configs import base

DEFAULT_LORA_TARGETS = base.DEFAULT_LORA_TARGETS  # per model family (diffusion_opd/models/specs.py)

HUB_REPO = "quanhaol/DiffusionOPD"  # the released teachers and student (LoRA subfolders)
FLUX_DEV = "black-forest-labs/FLUX.1-dev"  # gated: accept the licence, `hf auth login`
SD35_LARGE = "stabilityai/stable-diffusion-3.5-large"
QWEN_IMAGE = "Qwen/Qwen-Image"
FLUX2_DEV = "black-forest-labs/FLUX.2-dev"  # gated: accept the licence, `hf auth login`
WAN21_T2V = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"  # the 14B folder (Wan-AI/Wan2.1-T2V-14B-Diffusers) runs alike
WAN22_T2V = "Wan-AI/Wan2.2-T2V-A14B-Diffusers"  # two 14B experts (high / low noise)


def _released_teachers():
    # Per-teacher CFG of the release: GenEval 1.0, OCR 4.5, aesthetic 4.5.
    return {
        "geneval": base.teacher(HUB_REPO, "GenEvalTeacher/lora", guidance_scale=1.0),
        "ocr": base.teacher(HUB_REPO, "OCRTeacher/lora", guidance_scale=4.5),
        "aesthetic": base.teacher(HUB_REPO, "AesTeacher/lora", guidance_scale=4.5),
    }


def _released_tasks():
    return {
        "geneval": base.task("geneval", teacher="geneval", eval_prompts="geneval", reward="geneval"),
        "ocr": base.task("ocr", teacher="ocr", eval_prompts="ocr", reward="ocr"),
        "aesthetic": base.task("pickscore", teacher="aesthetic", eval_prompts="pickscore", reward="pickscore"),
    }


def mopd():
    """The released multi-teacher recipe: SD3.5-M LoRA student, 3 teachers, ODE, 10 steps, 512 px,
    3 images per GPU per task, trained on 9 of 10 steps, AdamW 3e-4, EMA 0.9 (8 GPUs: 72 images
    per optimizer step)."""
    c = base.get_config()
    c.run_name = "mopd"
    c.output_dir = "outputs/mopd"
    c.mixed_precision = "fp16"
    c.model.dtype = "fp16"
    c.expect_world_size = 0  # the launch scripts set it to the number of GPUs they start
    c.sample.num_steps = 10
    c.sample.noise_level = 0.0
    c.sample.guidance_scale = 4.5
    c.sample.resolution = 512
    c.train.batch_size = 3
    c.train.num_train_steps = 9
    c.train.learning_rate = 3e-4
    c.train.ema_decay = 0.9
    c.train.num_rounds = 300  # not stated in the release; the paper's curves are flat well before this
    c.eval.every = 30
    c.teachers = _released_teachers()
    c.tasks = _released_tasks()
    return c


def mopd_sde():
    """mopd with SDE rollouts (noise level 0.7) and the closed-form KL of paper eq. (11)."""
    c = mopd()
    c.run_name = "mopd_sde"
    c.output_dir = "outputs/mopd_sde"
    c.sample.noise_level = 0.7
    c.train.loss = "kl"
    return c


def _single(task_name):
    c = mopd()
    c.run_name = f"sopd_{task_name}"
    c.output_dir = f"outputs/sopd_{task_name}"
    tasks = _released_tasks()
    teacher_name = tasks[task_name].teacher
    c.tasks = {task_name: tasks[task_name]}
    c.teachers = {teacher_name: _released_teachers()[teacher_name]}
    return c


def sopd_geneval():
    """Single teacher: GenEval."""
    return _single("geneval")


def sopd_ocr():
    """Single teacher: OCR."""
    return _single("ocr")


def sopd_pickscore():
    """Single teacher: the aesthetic teacher on PickScore prompts, monitored by PickScore."""
    c = _single("aesthetic")
    c.run_name, c.output_dir = "sopd_pickscore", "outputs/sopd_pickscore"
    return c


# Two small prompt sets for the CPU run: no download needed.
_TINY_A, _TINY_B = base.TINY_OBJECTS, base.TINY_SIGNS


def tiny_mopd():
    """CPU demo/test: a tiny random SD3 (built in seconds, offline) distilled from two random
    teacher adapters on two prompt sets; the held-out L2 to each teacher should fall >= 50%."""
    c = base.get_config()
    c.run_name = "tiny_mopd"
    c.output_dir = "outputs/tiny_mopd"
    base.tiny_sd3_cpu(c)
    c.sample.num_steps = 6
    c.sample.resolution = 64
    c.sample.guidance_scale = 2.0
    c.train.batch_size = 2
    c.train.num_train_steps = 5
    c.train.num_rounds = 40
    c.train.learning_rate = 3e-2
    c.train.ema_decay = 0.0
    c.save_every = 20
    c.eval.every = 10
    c.eval.num_prompts = 4
    c.eval.num_steps = 6
    c.teachers = {
        "teacher_a": base.teacher("builtin:tiny-teacher:1", guidance_scale=1.0),
        "teacher_b": base.teacher("builtin:tiny-teacher:2", guidance_scale=2.0),
    }
    c.tasks = {
        "objects": base.task(tuple(_TINY_A[:12]), teacher="teacher_a", eval_prompts=tuple(_TINY_A[12:])),
        "signs": base.task(tuple(_TINY_B[:12]), teacher="teacher_b", eval_prompts=tuple(_TINY_B[12:])),
    }
    return c


def tiny_flux_mopd():
    """tiny_mopd on a tiny random FLUX.1 (guidance-distilled: the student's and the teachers'
    guidance scales feed the guidance embedding, one forward each); same acceptance bar."""
    c = tiny_mopd()
    c.run_name = "tiny_flux_mopd"
    c.output_dir = "outputs/tiny_flux_mopd"
    c.model.path = "builtin:tiny-flux"
    c.model.guidance = "embedded"
    # Measured: with 16 T5 tokens the tiny FLUX student barely moves toward its teachers
    # (held-out distance -20% in 40 rounds); with 128 (mostly padding) it falls by ~70%.
    c.model.max_sequence_length = 128
    c.lora.target_modules = DEFAULT_LORA_TARGETS["flux"]
    c.sample.guidance_scale = 3.5
    c.teachers.teacher_a.guidance_scale = 3.5
    c.teachers.teacher_b.guidance_scale = 2.0
    return c


def _tiny_family(c, name, family, guidance="auto"):
    """tiny_mopd's recipe on the tiny random pipeline ``builtin:<name>`` of another family."""
    c.model.path = f"builtin:{name}"
    c.model.guidance = guidance
    c.model.max_sequence_length = 32  # the prompts' distinguishing words fit after the template tokens
    c.lora.target_modules = DEFAULT_LORA_TARGETS[family]
    return c


def tiny_qwen_image_mopd():
    """tiny_mopd on a tiny random Qwen-Image (true CFG with its rescale, as QwenImagePipeline);
    same acceptance bar: held-out distance to each teacher falls >= 50%."""
    c = _tiny_family(tiny_mopd(), "tiny-qwen-image", "qwen_image")
    c.run_name, c.output_dir = "tiny_qwen_image_mopd", "outputs/tiny_qwen_image_mopd"
    return c


def tiny_flux2_mopd():
    """tiny_mopd on a tiny random FLUX.2 (guidance-distilled: the scales feed its guidance
    embedding, one forward each); same acceptance bar."""
    c = _tiny_family(tiny_mopd(), "tiny-flux2", "flux2", guidance="embedded")
    c.run_name, c.output_dir = "tiny_flux2_mopd", "outputs/tiny_flux2_mopd"
    # As tiny_flux_mopd: FLUX.2 attends to its padding, and with 128 text tokens (mostly padding)
    # beside the 16 image tokens the teachers' change is more prompt- than noise-driven (measured
    # on the CPU, 40 rounds: held-out distance -63% / -59% (seed 7: -53% / -50%); see
    # _TEACHER_TARGETS in diffusion_opd/models/tiny.py for the teachers).
    c.model.max_sequence_length = 128
    c.sample.guidance_scale = 2.5
    c.teachers.teacher_a.guidance_scale = 2.5
    c.teachers.teacher_b.guidance_scale = 1.5
    return c


def tiny_wan_t2v_mopd():
    """tiny_mopd on a tiny random Wan 2.1 text-to-video model: 5 frames of 64 px (16 x 2 x 8 x 8
    latents), CFG; same acceptance bar (the held-out distance is over whole videos)."""
    c = _tiny_family(tiny_mopd(), "tiny-wan", "wan")
    c.run_name, c.output_dir = "tiny_wan_t2v_mopd", "outputs/tiny_wan_t2v_mopd"
    c.sample.num_frames = 5
    return c


def tiny_wan22_t2v_mopd():
    """tiny_wan_t2v_mopd on a tiny random Wan 2.2 A14B (two experts: the high-noise one at model
    timesteps >= 875, the low-noise one below, shift 12: both run in every rollout). The student LoRA
    spans both experts, each teacher is one adapter per expert; the low-noise expert's CFG scale is
    model.guidance_scale_2 (3/4 of the high-noise scale, as the card's 3.0 / 4.0). Same acceptance bar."""
    c = _tiny_family(tiny_mopd(), "tiny-wan22", "wan")
    c.run_name, c.output_dir = "tiny_wan22_t2v_mopd", "outputs/tiny_wan22_t2v_mopd"
    c.sample.num_frames = 5
    c.model.guidance_scale_2 = 1.5
    return c


def _train_every_step(c):
    """Train all sample.num_steps steps, not the first 9 of 10. mopd (SD3.5-M) leaves out the last
    step because SD3's schedule ends at sigma 0.009 (nothing left to denoise); the pipelines that
    sample linspace(1, 1/N, N) through their shift end far higher at 10 steps: FLUX.1-dev at 512 px
    at 0.17, Wan 2.1 (shift 3) at 0.25, FLUX.2-dev at 1024 px at 0.52, so an untrained last step
    would leave a quarter to half of the denoising to a student never matched there (Qwen-Image's
    shift_terminal ends at 0.02: it keeps mopd's 9). tests/test_configs.py checks the rule."""
    c.train.num_train_steps = c.sample.num_steps
    return c


def _flux_dev(c):
    """FLUX.1-dev as the backbone (guidance-distilled: the guidance scales feed its embedding)."""
    c.model.path = FLUX_DEV
    c.model.guidance = "embedded"  # FLUX.1-dev is guidance-distilled: no uncond branch
    c.model.dtype = "bf16"
    c.mixed_precision = "bf16"
    c.model.max_sequence_length = 512  # FluxPipeline's default T5 length
    c.model.gradient_checkpointing = True  # see docs/benchmarks.md for the memory of a round
    c.lora.target_modules = DEFAULT_LORA_TARGETS["flux"]
    c.sample.guidance_scale = 3.5  # FluxPipeline's default embedded guidance
    c.sample.shift = 0.0  # 0 = the resolution-dependent shift (mu 0.63 at 512 px)
    return c


def flux_mopd():
    """The multi-teacher recipe on FLUX.1-dev at 512 px: three task teachers distilled into one
    LoRA student. No FLUX teachers are released: give yours as LoRA folders or Hub repos +
    subfolders (``teachers.<name>.path`` / ``.subfolder``; ``kind="transformer"`` for fully
    fine-tuned transformers), e.g. ``teachers.geneval.path=/ckpt/flux_geneval/lora``."""
    c = _train_every_step(_flux_dev(mopd()))
    c.run_name = "flux_mopd"
    c.output_dir = "outputs/flux_mopd"
    c.teachers = {
        "geneval": base.teacher("your-org/flux-opd-teachers", "geneval/lora", guidance_scale=3.5),
        "ocr": base.teacher("your-org/flux-opd-teachers", "ocr/lora", guidance_scale=3.5),
        "aesthetic": base.teacher("your-org/flux-opd-teachers", "aesthetic/lora", guidance_scale=3.5),
    }
    return c


def _user_teachers(repo, guidance):
    """The three task teachers as LoRA folders you provide (none are released for this model)."""
    return {name: base.teacher(repo, f"{name}/lora", guidance_scale=guidance) for name in ("geneval", "ocr", "aesthetic")}


def _large_model(name, path, family, resolution, guidance):
    """mopd on a 20B-class backbone: bf16 weights, gradient checkpointing, the family's LoRA
    targets, the pipeline's own (dynamic) shift, 512 text tokens, one image (video) per task per
    GPU, the model card's resolution and guidance, and three user-given teachers at that guidance."""
    c = mopd()
    c.run_name, c.output_dir = name, f"outputs/{name}"
    c.model.path = path
    c.model.dtype = "bf16"
    c.mixed_precision = "bf16"
    c.model.gradient_checkpointing = True
    c.model.max_sequence_length = 512  # the pipelines' default text length (Qwen-Image allows 1024)
    c.lora.target_modules = DEFAULT_LORA_TARGETS[family]
    c.sample.shift = 0.0
    c.sample.resolution = resolution
    c.sample.guidance_scale = guidance
    c.train.batch_size = 1
    c.teachers = _user_teachers(f"your-org/{name.removesuffix('_mopd').replace('_', '-')}-opd-teachers", guidance)
    return c


def qwen_image_mopd():
    """The multi-teacher recipe on Qwen-Image. Geometry from the model card's example: 1328 px
    (1:1), true CFG 4.0 against the negative prompt (QwenImagePipeline's true_cfg_scale, with its
    norm rescale); 10 rollout steps as in mopd (the card samples 50). No Qwen-Image OPD teachers are
    released: give yours (``teachers.<name>.path``). The 20B transformer needs sharding (FSDP) or
    an 80 GB+ GPU per process for a LoRA round at this size."""
    return _large_model("qwen_image_mopd", QWEN_IMAGE, "qwen_image", resolution=1328, guidance=4.0)


def flux2_mopd():
    """The multi-teacher recipe on FLUX.2-dev (guidance-distilled: the scales feed its guidance
    embedding). Geometry from Flux2Pipeline's documented example: 1024 px (its default size),
    embedded guidance 2.5; 10 rollout steps as in mopd (the example samples 50). Teachers: yours."""
    c = _train_every_step(_large_model("flux2_mopd", FLUX2_DEV, "flux2", resolution=1024, guidance=2.5))
    c.model.guidance = "embedded"
    return c


def wan_t2v_mopd():
    """The multi-teacher recipe on Wan 2.1 text-to-video. Geometry from the model card's example:
    81 frames at 480p, CFG 5.0, flow shift 3.0 (the folder's scheduler); the rollout samples square
    frames, so 480 x 480 (the card's 480 x 832 is not square); 10 rollout steps (the card samples
    50). Image rewards score the videos frame by frame (``sample.reward_frames``). The aesthetic
    task samples the built-in motion prompts (``video_motion``: PickScore reads any prompt, and
    still-image captions ask a video model for no motion); GenEval and OCR keep their prompt sets,
    which their rewards read (GenEval's metadata, the text OCR looks for). Teachers: yours."""
    c = _train_every_step(_large_model("wan_t2v_mopd", WAN21_T2V, "wan", resolution=480, guidance=5.0))
    c.tasks.aesthetic.prompts = c.tasks.aesthetic.eval_prompts = "video_motion"
    c.sample.num_frames = 81
    c.sample.reward_frames = "count:8"
    return c


def wan22_t2v_mopd():
    """wan_t2v_mopd on Wan 2.2 T2V A14B: two 14B experts, the high-noise one at timesteps >= 875
    (the folder's boundary_ratio), one student LoRA spanning both, each teacher a LoRA on both
    (``transformer_2/`` in its folder). The card's CFG: 4.0 for the high-noise expert, 3.0 for the
    low-noise one (model.guidance_scale_2). Its schedule (flow shift 12) ends at sigma 0.57 at 10
    steps: every step trained. Both experts' 57 GB of bf16 weights want distributed.strategy=fsdp over
    several GPUs (``python scripts/round_budget.py --models wan2.2-t2v-a14b``). Teachers: yours."""
    c = wan_t2v_mopd()
    c.run_name, c.output_dir = "wan22_t2v_mopd", "outputs/wan22_t2v_mopd"
    c.model.path = WAN22_T2V
    c.sample.guidance_scale = 4.0
    c.model.guidance_scale_2 = 3.0
    c.teachers = _user_teachers("your-org/wan22-t2v-opd-teachers", 4.0)
    return c


def sd35_large_mopd():
    """The released recipe with SD3.5-Large as the backbone: the same SD3 code path, only the
    model and the (user-supplied) teachers differ. bf16 weights (the 8B transformer in fp16 needs
    the same memory but overflows more easily); gradient checkpointing on."""
    c = mopd()
    c.run_name = "sd35_large_mopd"
    c.output_dir = "outputs/sd35_large_mopd"
    c.model.path = SD35_LARGE
    c.model.dtype = "bf16"
    c.mixed_precision = "bf16"
    c.model.gradient_checkpointing = True
    c.teachers = {
        "geneval": base.teacher("your-org/sd35-large-opd-teachers", "geneval/lora", guidance_scale=1.0),
        "ocr": base.teacher("your-org/sd35-large-opd-teachers", "ocr/lora", guidance_scale=4.5),
        "aesthetic": base.teacher("your-org/sd35-large-opd-teachers", "aesthetic/lora", guidance_scale=4.5),
    }
    return c


CONFIGS = {f.__name__: f for f in (mopd, mopd_sde, sopd_geneval, sopd_ocr, sopd_pickscore, tiny_mopd, tiny_flux_mopd,
                                   tiny_qwen_image_mopd, tiny_flux2_mopd, tiny_wan_t2v_mopd, tiny_wan22_t2v_mopd, flux_mopd,
                                   sd35_large_mopd, qwen_image_mopd, flux2_mopd, wan_t2v_mopd, wan22_t2v_mopd)}


def get_config(name="mopd"):
    if name not in CONFIGS:
        raise ValueError(f"unknown config '{name}' in config/opd.py; valid: {', '.join(CONFIGS)}")
    return CONFIGS[name]()
