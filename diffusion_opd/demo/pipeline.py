"""The demo, stage by stage: base pretraining, stage 1 (one teacher per task), stage 2 (OPD),
the baselines, the measurements, the report. ``scripts/demo.py`` calls :func:`run_demo`.

Every training stage is a named config of ``config/demo.py`` run by the library's own trainer,
exactly as ``scripts/train.py --config config/demo.py:NAME`` would run it.

Equal compute: every baseline gets as many training images (prompts rolled out and scored or
distilled) as the whole OPD pipeline used, stage 1 included; wall-clock is measured and reported
beside it (it is not deterministic, everything else is).
"""
from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import time
from dataclasses import dataclass, field

import torch

from ..config import ConfigError, config_file, load_config
from ..data import toy_world as world
from ..files import replace_atomically, write_json
from ..recipes import recipe_spec
from ..trainers import checkpoint as ckpt
from ..trainers.stop import NonFiniteError
from ..trainers.metrics import read_metrics
from . import report
from .evaluate import gradient_variance, sample_grid, task_rewards
from .pretrain import pretrain_base

CONFIG_FILE = config_file("demo.py")  # config/demo.py (diffusion_opd.named_configs in a wheel)
MARKER = ".written_by_demo"  # the demo replaces only a folder it wrote itself
SETUP = world.__doc__.split("(the report repeats it):", 1)[1].split("Pixels live", 1)[0].strip()
SAMPLE_PROMPTS = ["a red square", "a blue ring", "a green plus", 'a sign that says "T"', 'a sign that says "H"',
                  'a poster that says "E"', "a diamond, masterpiece", "a bar, high quality"]


@dataclass(frozen=True)
class Profile:
    """How long everything runs: ``full`` (``make demo``) or ``quick`` (the test suite)."""

    name: str
    pretrain_steps: int
    quick: bool  # use config/demo.py's QUICK rounds
    samples_per_prompt: int  # final table
    variance_trajectories: int  # per task


PROFILES = {
    "full": Profile("full", pretrain_steps=1500, quick=False, samples_per_prompt=8, variance_trajectories=32),
    "quick": Profile("quick", pretrain_steps=300, quick=True, samples_per_prompt=1, variance_trajectories=6),
}


def _demo_configs():
    spec = importlib.util.spec_from_file_location("_demo_configs", CONFIG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Demo:
    """Where the demo writes, how long it runs, and what it has measured so far."""

    output_dir: str
    profile: Profile
    seed: int = 0
    progress: bool = True
    timings: dict = field(default_factory=dict)
    methods: dict = field(default_factory=dict)  # name -> kind, label, run dir, seconds, images

    def path(self, *parts) -> str:
        return os.path.join(self.output_dir, *parts)

    def config(self, name: str, **overrides):
        """``config/demo.py:NAME`` with this demo's folders, seed and profile applied."""
        items = {"output_dir": self.path("runs", name), "model.path": self.path("base"), "seed": self.seed,
                 "logging.progress": self.progress}
        module = _demo_configs()
        if self.profile.quick:
            items.update({"train.num_rounds": module.QUICK[name], "save_every": module.QUICK_SAVE_EVERY})
        items.update(overrides)
        config = load_config(f"{CONFIG_FILE}:{name}", [f"{k}={v}" for k, v in items.items()])
        for teacher in config.teachers.values():  # config/demo.py's paths are relative to outputs/demo
            teacher.path = self.path(os.path.relpath(teacher.path, module.ROOT))
        return config

    def train(self, name: str, kind: str, label: str, offset: float = 0.0, method: str = "", **overrides) -> dict:
        """Run one config with the library's trainer and record it as (a stage of) a method of the
        report: ``method`` (default ``name``) collects the runs, seconds and images of its stages."""
        config = self.config(name, **overrides)
        print(f"[demo] {label}: config/demo.py:{name} ({config.recipe}), {config.train.num_rounds} rounds")
        start = time.perf_counter()
        stopped = ""
        try:
            train_config(config)
        except NonFiniteError as err:  # a result, not a crash: reported, its last checkpoint evaluated
            if kind != "ablation":
                raise
            stopped = str(err).split(":")[0]
            print(f"[demo] {label} diverged ({err})")
        seconds = time.perf_counter() - start
        self.timings[label] = seconds
        m = self.methods.setdefault(method or name, dict(kind=kind, label=label, runs=[], seconds=0.0, images=0,
                                                         offset=offset, guidance=config.sample.guidance_scale))
        m["runs"].append(config.output_dir)
        if stopped:
            m["diverged"] = stopped
        m["seconds"] += seconds
        done = len(_seconds_per_round(config.output_dir)) if stopped else config.train.num_rounds
        m["images"] += training_images(config) * done // config.train.num_rounds
        return m


def train_config(config) -> None:
    """The library's trainer for ``config.recipe`` (the registry's), as ``scripts/train.py`` runs it."""
    from ..trainers.recipes import train

    train(config)


def training_images(config) -> int:
    """Images rolled out for training over the run (every task, every round)."""
    return recipe_spec(config.recipe).images_per_round(config, 1) * config.train.num_rounds


WORK = ("base", "runs", "teachers")  # what the demo trains into: its own, rebuilt on every run
REPORT = ("results.json", "report.md", "convergence.png", "samples.png")  # replaced file by file at the end


def prepare_output_dir(path: str) -> None:
    """Create ``path``, or reuse it when an earlier demo wrote it (else refuse in one line).

    Only the demo's own working folders (``WORK``) are cleared. The previous report stays until
    the new one replaces it file by file (an interrupted rerun keeps it), and anything else in
    the folder (the user's notes, copies...) is never touched."""
    if os.path.isdir(path) and os.listdir(path):
        if not os.path.isfile(os.path.join(path, MARKER)):
            raise ConfigError(f"--output_dir {path}: the folder exists and was not written by the demo; choose "
                              "another folder or remove it yourself")
        print(f"[demo] replacing the previous demo's runs in {path} (its report stays until the new one is written)")
    os.makedirs(path, exist_ok=True)
    for name in WORK:
        if os.path.isdir(os.path.join(path, name)):
            shutil.rmtree(os.path.join(path, name))
    open(os.path.join(path, MARKER), "a").close()


def export_teacher(demo: Demo, task: str, method: dict) -> None:
    """The teacher run's last (EMA) student LoRA -> ``teachers/<task>`` (the path OPD's config reads)."""
    out = demo.path("teachers", task)
    os.makedirs(out, exist_ok=True)
    shutil.copy(os.path.join(ckpt.evaluated_folder(ckpt.latest(method["runs"][-1])), ckpt.LORA_WEIGHTS), out)


# ----------------------------------------------------------------------------------- stages
def stage1_teachers(demo: Demo) -> None:
    for task in world.TASKS:
        export_teacher(demo, task, demo.train(f"teacher_{task}", "teacher", f"{task} teacher"))


def stage2_students(demo: Demo) -> None:
    stage1 = sum(m["seconds"] for m in demo.methods.values() if m["kind"] == "teacher")
    demo.train("opd", "opd", "OPD student (ODE, L2)", offset=stage1)
    demo.train("opd_sde", "ablation", "OPD student (SDE, closed-form KL)", offset=stage1)
    demo.train("opd_ppo", "ablation", "OPD student (SDE, PPO-style)", offset=stage1)


def baselines(demo: Demo) -> None:
    """Multi-task NFT, multi-task GRPO-Guard and cascade NFT from the same base, each given the
    OPD pipeline's training images (cascade: a third per stage, each stage starting from the last
    one's EMA student)."""
    budget = sum(m["images"] for k, m in demo.methods.items() if m["kind"] == "teacher" or k == "opd")

    def rounds(name: str, images: float) -> int:
        config = demo.config(name)
        return max(1, round(images / (training_images(config) / config.train.num_rounds)))

    demo.train("multitask", "baseline", "multi-task NFT", **{"train.num_rounds": rounds("multitask", budget)})
    demo.train("multitask_guard", "baseline", "multi-task GRPO-Guard",
               **{"train.num_rounds": rounds("multitask_guard", budget)})
    stages = _demo_configs().CASCADES["cascade"]
    init = ""
    for i, stage in enumerate(stages):
        m = demo.train(stage, "baseline", "cascade NFT", method="cascade", **{
            "train.num_rounds": rounds(stage, budget / len(stages)), "model.student_init": init})
        init = ckpt.evaluated_folder(ckpt.latest(m["runs"][-1]))
        demo.timings[f"cascade NFT stage {i + 1} ({stage})"] = demo.timings.pop("cascade NFT")


# ----------------------------------------------------------------------------------- measurements
def measure(demo: Demo) -> tuple[dict, tuple]:
    """Rewards of every model, the convergence curves, the gradient variance (all fixed seeds);
    returns the results and the rows of samples.png."""
    from ..models import build_policy

    cfgs = _demo_configs()
    config = demo.config("opd")
    teacher_guidance = {t: config.teachers[t].guidance_scale for t in world.TASKS}
    policy = build_policy(config.model.path, lora=dict(rank=config.lora.rank, alpha=config.lora.alpha,
                                                       target_modules=list(config.lora.target_modules)),
                          teachers=[dict(name=t, path=demo.path("teachers", t)) for t in world.TASKS])
    start = time.perf_counter()
    variance = gradient_variance(policy, teacher_guidance, trajectories_per_task=demo.profile.variance_trajectories,
                                 num_steps=config.sample.num_steps, train_steps=config.train.num_train_steps,
                                 noise_level=cfgs.opd_sde().sample.noise_level,
                                 guidance_scale=config.sample.guidance_scale, reduction=config.train.loss_reduction,
                                 seed=demo.seed)
    demo.timings["gradient variance"] = time.perf_counter() - start

    start = time.perf_counter()

    def rewards(adapter: str, guidance: float, samples: int = demo.profile.samples_per_prompt) -> dict:
        return task_rewards(policy, adapter, samples_per_prompt=samples, num_steps=config.sample.num_steps,
                            guidance_scale=guidance, seed=demo.seed)

    methods = {"base": dict(kind="base", label="base (pretrained)", seconds=demo.timings["base pretraining"],
                            images=0, guidance=cfgs.GUIDANCE, rewards=rewards("base", cfgs.GUIDANCE))}
    for name, m in demo.methods.items():
        m = methods[name] = dict(m)
        curve, elapsed = [], m["offset"]
        for run in m.pop("runs"):  # a cascade's stages one after the other on the time axis
            per_round = _seconds_per_round(run)
            for r, path in ckpt.list_checkpoints(run):
                load_student(policy, path)
                curve.append(dict(seconds=elapsed + sum(per_round[:r]), rewards=rewards("student", m["guidance"], 1)))
            elapsed += sum(per_round)
            m["final_checkpoint"] = ckpt.latest(run)
        m["curve"] = curve
        if m["kind"] == "teacher":  # scored as the loaded teacher adapter OPD distils
            m["rewards"] = rewards(name.removeprefix("teacher_"), m["guidance"])
        else:
            load_student(policy, m["final_checkpoint"])
            m["rewards"] = rewards("student", m["guidance"])
    demo.timings["evaluation"] = time.perf_counter() - start
    order = ["base", *(f"teacher_{t}" for t in world.TASKS), "opd", "multitask", "multitask_guard", "cascade",
             "opd_sde", "opd_ppo"]
    methods = {k: methods[k] for k in order if k in methods}
    samples = sample_grid_images(demo, policy, methods, config.sample.num_steps)
    for m in methods.values():
        m.pop("final_checkpoint", None)
    results = dict(profile=demo.profile.name, seed=demo.seed, machine=_machine(), setup=SETUP,
                   command=f"python scripts/demo.py{' --quick' if demo.profile.quick else ''} --seed {demo.seed}",
                   eval=dict(num_steps=config.sample.num_steps, guidance_scale=cfgs.GUIDANCE,
                             samples=sum(len(p) for _, p in world.TASKS.values()) * demo.profile.samples_per_prompt),
                   methods=methods, variance=variance, timings=dict(demo.timings))
    results["claims"] = report.check_claims(results)
    return results, samples


def load_student(policy, checkpoint: str) -> None:
    """The student weights a trainer checkpoint's run evaluates, into the policy's student adapter:
    the EMA when the run kept one (``ema_state.pt``: the shadow in the order of the student's
    trainable parameters), else the raw student."""
    ema = os.path.join(checkpoint, "ema_state.pt")
    if os.path.isfile(ema):
        shadow = torch.load(ema, map_location="cpu", weights_only=False)["shadow"]
        params = policy.trainable_parameters()
        if len(shadow) != len(params):
            raise ValueError(f"{ema}: {len(shadow)} EMA tensors for {len(params)} student parameters")
        with torch.no_grad():
            for p, s in zip(params, shadow):
                p.copy_(s.to(p.dtype))
        return
    policy.load_student_state_dict(ckpt.read_student(checkpoint))


def _seconds_per_round(run_dir: str) -> list[float]:
    rows = [r for r in read_metrics(run_dir) if "seconds_per_round" in r]
    return [r["seconds_per_round"] for r in sorted(rows, key=lambda r: r["round"])]


def sample_grid_images(demo: Demo, policy, methods: dict, num_steps: int):
    """Rows of images for samples.png: every model on the same noise, each at its own CFG."""
    rows, labels = [], []
    for name, m in methods.items():
        if m["kind"] in ("base", "teacher"):
            adapter = "base" if name == "base" else name.removeprefix("teacher_")
        else:
            load_student(policy, m["final_checkpoint"])
            adapter = "student"
        rows.append(sample_grid(policy, [adapter], SAMPLE_PROMPTS, num_steps=num_steps, guidance_scale=m["guidance"],
                                seed=demo.seed)[0])
        labels.append(m["label"])
    return rows, labels


def _machine() -> str:
    return f"{platform.machine()} CPU, {os.cpu_count()} cores visible, torch {torch.__version__}, 1 thread per run"


def write_outputs(demo: Demo, results: dict, samples) -> str:
    """The report's files (``REPORT``), each replacing the previous demo's atomically."""
    write_json(demo.path("results.json"), results, indent=1, sort_keys=False)
    replace_atomically(demo.path("convergence.png"), lambda tmp: report.plot_convergence(results, tmp))
    replace_atomically(demo.path("samples.png"), lambda tmp: report.plot_samples(*samples, SAMPLE_PROMPTS, tmp))
    text = report.report_markdown(results)

    def write_text(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    replace_atomically(demo.path("report.md"), write_text)
    return demo.path("report.md")


def run_demo(output_dir: str = "outputs/demo", profile: str = "full", seed: int = 0, progress: bool = True) -> dict:
    """Everything, top to bottom; returns the results (also in ``<output_dir>/results.json``).

    One thread (the toy's matrices are tiny: more threads only add contention)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        demo = Demo(output_dir, PROFILES[profile], seed, progress)
        prepare_output_dir(output_dir)
        start = time.perf_counter()
        pretrain_base(demo.path("base"), steps=demo.profile.pretrain_steps, seed=seed, progress=progress)
        demo.timings["base pretraining"] = time.perf_counter() - start
        stage1_teachers(demo)
        stage2_students(demo)
        baselines(demo)
        results, samples = measure(demo)
        results["timings"]["total"] = time.perf_counter() - start
        write_outputs(demo, results, samples)
        return results
    finally:
        torch.set_num_threads(threads)
