"""The schema: every key of every run with its default. Named configs (config/opd.py) start from
here (``from diffusion_opd.configs import base``) and change what differs.

Keys that external scripts rely on: ``output_dir``, ``train.num_rounds``, ``save_every``,
``resume_from``. Every key is validated (diffusion_opd/config.py) before any model loads.
"""
import ml_collections

from ..models.specs import DEFAULT_LORA, DEFAULT_LORA_TARGETS  # noqa: F401 (the configs' name for the targets)

# Two small prompt sets of the CPU configs (tiny_mopd, the tiny stage-1 configs): no download.
TINY_OBJECTS = [f"a photo of a {c} {o}" for c in ("red", "blue", "green", "yellow") for o in ("cup", "dog", "car", "bird")]
TINY_SIGNS = [f'a sign that says "{w}"' for w in (
    "hello", "world", "open", "closed", "exit", "stop", "sale", "cafe", "shop", "bank", "park", "zoo",
    "bus", "taxi", "hotel", "bar")]


def get_config():
    c = ml_collections.ConfigDict()
    c.recipe = "opd"  # which trainer runs this config: opd | nft | grpo (scripts/train.py dispatches)
    c.run_name = "run"
    c.output_dir = "outputs/run"
    c.seed = 42
    c.device = "auto"  # auto = cuda when available, else cpu
    c.cpu_threads = 0  # >0: torch.set_num_threads on the CPU (1 is fastest for tiny models)
    c.mixed_precision = "no"  # no | fp16 | bf16 (autocast around the transformer)
    c.expect_world_size = 0  # >0: refuse to run unless exactly this many processes started
    c.data_root = "dataset"  # where scripts/download_data.py puts the public prompt files
    c.save_every = 10  # rounds between checkpoints (one is always written at the end)
    c.keep_last = 3  # checkpoints kept on disk
    c.resume_from = ""  # "" | "latest" | path to a checkpoints/round-N folder
    c.overwrite = False  # True: a new run in a used output_dir moves the old files aside (never deletes)

    # The backbone: a Hub id or a local diffusers pipeline folder.
    c.model = ml_collections.ConfigDict()
    c.model.path = "stabilityai/stable-diffusion-3.5-medium"
    c.model.revision = ""
    c.model.dtype = "fp32"  # weights of the frozen backbone: fp32 | fp16 | bf16
    c.model.gradient_checkpointing = False
    c.model.max_sequence_length = 128
    c.model.student_init = ""  # "" = a fresh LoRA; else a LoRA folder or Hub repo (PEFT or diffusers format)
    c.model.student_init_subfolder = ""  # the student starts as exactly that adapter (its rank / alpha / targets)
    c.model.offload_text_encoders = False  # True: text encoders back to the CPU after each encode (-11 GB, slower)
    # What sample.guidance_scale / teachers.*.guidance_scale drive: auto = the guidance embedding of a
    # guidance-distilled model (FLUX.1-dev), classifier-free guidance otherwise (SD3); true_cfg = CFG
    # with the empty prompt (FLUX: the embedding then gets embedded_guidance); embedded = demand it.
    c.model.guidance = "auto"
    c.model.embedded_guidance = 1.0
    # Wan 2.2 A14B: the low-noise expert's CFG scale (WanPipeline's guidance_scale_2, the card's 3.0
    # beside guidance 4.0); 0 = each call's own scale in both experts (the pipeline's default).
    c.model.guidance_scale_2 = 0.0

    # The student LoRA (DiffusionNFT / released recipe defaults).
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = DEFAULT_LORA["rank"]
    c.lora.alpha = DEFAULT_LORA["alpha"]
    c.lora.init = DEFAULT_LORA["init"]
    c.lora.target_modules = DEFAULT_LORA["target_modules"]  # the 8 joint-attention projections of SD3

    # How the student rolls out (and is trained on its own states).
    c.sample = ml_collections.ConfigDict()
    c.sample.num_steps = 10
    c.sample.noise_level = 0.0  # 0 = ODE (loss: opd_l2); > 0 = SDE (loss: opd_kl)
    c.sample.guidance_scale = 4.5  # student CFG for rollout and training
    c.sample.resolution = 512
    c.sample.shift = 0.0  # 0 = the pipeline scheduler's own shift (3.0 for SD3.5)
    c.sample.num_frames = 0  # video models (Wan): frames per video, 1 + a multiple of 4; 0 = an image model
    c.sample.reward_frames = "all"  # video: frames an image reward scores: all | first | middle | last | count:k | stride:k
    c.sample.frame_reduce = "mean"  # video: an image reward's frame scores -> one per video: mean | min

    c.train = ml_collections.ConfigDict()
    c.train.num_rounds = 1000
    c.train.batch_size = 3  # images per process per task per micro-batch
    c.train.grad_accum = 1  # micro-batches per task per round (images/task/process = batch * accum)
    c.train.num_train_steps = 9  # trained steps per trajectory (first k of sample.num_steps)
    c.train.step_selection = "first"  # first | random (a random subset per round)
    c.train.mode = "fused"  # fused (student grad forward inside the rollout) | two_pass (rollout, then replay)
    c.train.loss = "auto"  # auto (l2 for ODE, kl for SDE) | l2 | kl | ppo
    c.train.loss_reduction = "mean"  # mean over C*H*W (peers' scale) | sum (exact KL)
    c.train.kl_denominator = "true"  # true (s^2, the paper) | released (std_dev_t^2, the released code)
    c.train.learning_rate = 3e-4
    c.train.adam_beta1 = 0.9
    c.train.adam_beta2 = 0.999
    c.train.adam_eps = 1e-8
    c.train.weight_decay = 1e-4
    c.train.max_grad_norm = 1.0
    c.train.lr_schedule = "constant"  # constant | cosine | linear (diffusers' schedulers, trainers/schedule.py)
    c.train.warmup_rounds = 0  # linear warm-up: round W+1 is the first at the peak rate
    c.train.ema_decay = 0.9  # 0 disables the EMA; one EMA update per optimizer step (per round)
    c.train.ema_warmup = False  # True: decay min(ema_decay, (1 + n) / (10 + n)) at the n-th step, n from 1 (the peers' ramp)
    c.train.nan_patience = 3  # stop after this many non-finite rounds in a row
    c.train.stop_after_round = 0  # >0: exit cleanly after this round (scripted pauses, tests)

    # Teachers: name -> {path, subfolder, weight_name, kind (lora | transformer), guidance_scale}.
    c.teachers = ml_collections.ConfigDict()
    # Tasks: name -> {prompts (dataset name | file path | list of prompts), eval_prompts, teacher, reward}.
    c.tasks = ml_collections.ConfigDict()

    # Stage 1 (recipe nft | grpo): k images per prompt, rewards, group-relative advantages.
    # The task's reward is tasks.<name>.reward: "ocr" or weighted "ocr:1.0,pickscore:0.5".
    c.rl = ml_collections.ConfigDict()
    c.rl.group_size = 8  # images per prompt (k); a sample's advantage is relative to its prompt's group
    c.rl.groups_per_round = 2  # prompts per task per process per round
    c.rl.updates_per_round = 1  # optimizer steps per pass over the round's samples
    c.rl.inner_epochs = 1  # passes over the round's samples (grpo); the ratio is 1 only in the first
    # std: global (both references' released code: std of the whole gathered task batch) | group (the
    # Flow-GRPO paper's formula, per prompt group) | none
    c.rl.advantage_std = "global"
    c.rl.advantage_clip = 5.0  # advantages clamped to +-this
    c.rl.drop_zero_advantage = False  # Flow-GRPO: groups whose rewards are all equal carry no signal
    c.rl.kl_beta = 0.0  # KL to the base model (Flow-GRPO 0.04, 0.01 for PickScore; DiffusionNFT 1e-4)
    # grpo with CFG: detach_uncond (Flow-GRPO's code: gradient g dv_cond) | both (through both branches:
    # g dv_cond + (1 - g) dv_uncond, which pushes the unconditional prediction against the reward)
    c.rl.cfg_grad = "detach_uncond"
    c.rl.nft_beta = 1.0  # DiffusionNFT's branch strength beta (0.1 for OCR)
    c.rl.nft_sampler = "dpm2"  # nft's clean samples: dpm2 (DiffusionNFT, DPM-Solver++(2M)) | euler (the ODE)
    # nft's trained noise levels: per_sample (DiffusionNFT: each sample its own random train.num_train_steps of
    # the sample.num_steps levels) | first (the first train.num_train_steps, train.step_selection applies)
    c.rl.nft_step_sampling = "per_sample"
    # DiffusionNFT old policy <- EMA of the student, decay 0 before `delay` optimizer steps, then
    # min(rate * (step - delay), max): its decay_type 1 (0.001, 0.5, 0; GenEval, PickScore) or 2 (OCR)
    c.rl.old_decay_rate = 0.001
    c.rl.old_decay_max = 0.5
    c.rl.old_decay_delay = 0
    c.rl.clip_range = 1e-4  # Flow-GRPO's PPO clip on ratios of per-element averaged log-densities
    c.rl.guard = False  # GRPO-Guard: normalised ratio and 1/(-dt) step weights
    c.rl.reward_device = "auto"

    # Periodic evaluation on held-out prompts: student-vs-teacher KL/L2 always, rewards if set.
    c.eval = ml_collections.ConfigDict()
    c.eval.every = 30  # rounds, and always at the last round; 0 disables
    c.eval.num_prompts = 8  # per task per process
    c.eval.num_steps = 10
    c.eval.rewards = False  # also decode images and score them with each task's reward
    c.eval.reward_device = "auto"
    c.eval.sample_images = 4  # per task: a teacher-vs-student picture under <output_dir>/samples/ at every eval (0: none)

    # Speed levers (docs/benchmarks.md): the same maths and gradients, run differently.
    c.perf = ml_collections.ConfigDict()
    c.perf.compile = "auto"  # auto (on for CUDA, off on the CPU; not yet measured on a GPU) | on | off: torch.compile per block
    c.perf.compile_backend = "inductor"  # inductor fuses; eager / aot_eager only trace (CPU tests)
    # false: one graph per batch shape (the released round has 4: 6 / 3 rows, 18 / 15 in lockstep);
    # true: symbolic shapes (dynamo's own default, None, turns them dynamic at the first new shape)
    c.perf.compile_dynamic = False
    c.perf.lockstep_tasks = False  # all tasks of a round in one batch (one student forward, one mixed-teacher forward per step)
    c.perf.merge_teachers = False  # each LoRA teacher merged into its own copy of the layers it adapts (+W per adapted layer)

    # How processes share the model (trainers/sharding.py, README "Sharded training").
    c.distributed = ml_collections.ConfigDict()
    c.distributed.strategy = "ddp"  # ddp: every process holds the whole model | fsdp: FSDP2, 1/N of every weight each
    c.distributed.reshard_after_forward = True  # fsdp: free a block's gathered weights after its forward (memory)
    # The memory of the GPU a run will use, for --validate_only's budget (diffusion_opd/budget.py): 0 = read it
    # from CUDA (unknown on a machine without one); > 0 = this many GB (planning a run from another machine)
    c.distributed.gpu_memory_gb = 0.0
    # Text encoders: replicate (whole on every process) | shard (fsdp only: FSDP2 per encoder layer,
    # 1/N each, encoding in lockstep) | rank0 (ddp or fsdp: only rank 0 loads them and encodes every
    # process's prompts). Same embeddings either way (trainers/sharding.py).
    c.distributed.text_encoders = "replicate"

    c.logging = ml_collections.ConfigDict()
    # Experiment trackers through accelerate (comma-separated): wandb, tensorboard, mlflow, comet_ml,
    # aim... (installed separately: pip install 'diffusion_opd[wandb]' / '[tensorboard]'). metrics.jsonl
    # is always written and is the source of truth; trackers get a copy (trainers/trackers.py).
    c.logging.trackers = ""
    c.logging.wandb_mode = "disabled"  # online | offline: also adds wandb to logging.trackers, in that mode
    c.logging.wandb_project = "diffusion_opd"  # the project of every tracker (tensorboard: logs/<project>/)
    c.logging.progress = True  # tqdm bar over rounds
    c.logging.curve_smoothing = 0.6  # curves.png: TensorBoard-style smoothing in [0, 1) of lines of 10+ points
    c.logging.curve_log_scale = False  # curves.png: log y axis (panels with values <= 0 stay linear)
    c.logging.phase_times = False  # log seconds/<phase>; syncs CUDA at every phase boundary (profiling only)
    return c


def stage1(recipe, run_name):
    """What the published DiffusionNFT and Flow-GRPO SD3.5-M recipes share: fp16, 10 steps at
    512 px of which 9 are trained (timestep fraction 0.99), AdamW 3e-4 with clip 1.0, 48 prompt
    groups x 24 images per round on 8 GPUs, advantages over the global std, an EMA of the
    student (decay 0.9 with the (1 + n) / (10 + n) ramp) that evaluation and the checkpoint's
    ``ema/`` folder use (the weights a teacher is), evaluation with the task rewards every 30
    rounds on 40-step ODE samples with the sampling CFG."""
    c = get_config()
    c.recipe = recipe
    c.run_name, c.output_dir = run_name, f"outputs/{run_name}"
    c.mixed_precision = "fp16"
    c.model.dtype = "fp16"
    c.sample.num_steps = 10
    c.sample.resolution = 512
    c.train.batch_size = 8
    c.train.num_train_steps = 9
    c.train.learning_rate = 3e-4
    c.train.max_grad_norm = 1.0
    c.train.ema_decay = 0.9
    c.train.ema_warmup = True
    c.train.num_rounds = 1000
    c.rl.group_size = 24
    c.rl.groups_per_round = 6  # 48 groups on 8 GPUs
    c.rl.updates_per_round = 2
    c.rl.advantage_std = "global"
    c.eval.every = 30
    c.eval.num_steps = 40
    c.eval.rewards = True
    return c


def tiny_sd3_cpu(c):
    """A tiny random SD3 built offline in seconds (``builtin:tiny-sd3``), run on the CPU."""
    c.device = "cpu"
    c.cpu_threads = 1  # tiny matrices: threading overhead exceeds the work
    c.model.path = "builtin:tiny-sd3"
    c.model.max_sequence_length = 16
    c.lora.rank = 8
    c.lora.alpha = 8
    return c


def reward_task(prompts, reward):
    """A stage-1 task: prompts (also held out for evaluation) and the reward that trains on them."""
    return task(prompts, teacher="", eval_prompts=prompts, reward=reward)


def tiny_stage1(c):
    """The CPU settings of the tiny stage-1 configs (config/nft.py, config/grpo.py): a tiny random
    SD3 built offline, 32 px (16 x 4 x 4 latents: few dimensions, so a few samples per round
    already show the reward rising), 4 steps, 2 prompts x 8 images per round, 10 rounds, and the
    reward on fixed held-out prompts and seeds at the start and the end."""
    tiny_sd3_cpu(c)
    c.mixed_precision = "no"
    c.model.dtype = "fp32"
    c.sample.num_steps = 4
    c.sample.resolution = 32
    c.train.batch_size = 8
    c.train.num_train_steps = 3
    c.train.num_rounds = 10
    c.train.learning_rate = 5e-2
    c.rl.group_size = 8
    c.rl.groups_per_round = 2
    c.rl.kl_beta = 0.0
    c.save_every = 5
    c.eval.every = 10
    c.eval.num_prompts = 4
    c.eval.num_steps = 4
    return c


def tiny_wan_stage1(c):
    """A tiny stage-1 config (:func:`tiny_stage1`) on the tiny random Wan 2.1 text-to-video model:
    5 frames of 32 px (16 x 2 x 4 x 4 latents) on the built-in motion prompts (``video_motion``),
    reward = brightness scored on every frame and averaged per video, no CFG (half the forwards
    on the CPU)."""
    c.tasks = {"bright": reward_task("video_motion", reward="brightness")}
    c.model.path = "builtin:tiny-wan"
    c.model.max_sequence_length = 32
    c.lora.target_modules = DEFAULT_LORA_TARGETS["wan"]
    c.sample.num_frames = 5
    c.sample.reward_frames = "all"
    c.sample.guidance_scale = 1.0
    return c


def teacher(path, subfolder="", kind="lora", guidance_scale=1.0, weight_name=""):
    """One teacher entry (see c.teachers)."""
    return ml_collections.ConfigDict(
        dict(path=path, subfolder=subfolder, kind=kind, guidance_scale=guidance_scale, weight_name=weight_name)
    )


def task(prompts, teacher, eval_prompts="", reward=""):
    """One task entry (see c.tasks)."""
    return ml_collections.ConfigDict(dict(prompts=prompts, eval_prompts=eval_prompts, teacher=teacher, reward=reward))
