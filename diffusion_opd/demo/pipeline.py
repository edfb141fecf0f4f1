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
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field

import torch

from ..config import ConfigError, load_config
from ..trainers import checkpoint as ckpt
from ..trainers.metrics import read_metrics
from . import report, world
from .evaluate import checkpoint_rewards, gradient_variance, sample_grid, task_rewards
from .pretrain import pretrain_base

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_FILE = os.path.join(REPO, "config", "demo.py")
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
    "full": Profile("full", pretrain_steps=2000, quick=False, samples_per_prompt=4, variance_trajectories=32),
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

    def train(self, name: str, kind: str, label: str, offset: float = 0.0, **overrides) -> dict:
        """Run one config with the library's trainer and record it as a method of the report."""
        config = self.config(name, **overrides)
        print(f"[demo] {label}: config/demo.py:{name}, {config.train.num_rounds} rounds")
        start = time.perf_counter()
        train_config(config)
        seconds = time.perf_counter() - start
        self.timings[label] = seconds
        self.methods[name] = dict(kind=kind, label=label, run_dir=config.output_dir, seconds=seconds,
                                  images=training_images(config), offset=offset)
        return self.methods[name]


def train_config(config) -> None:
    """The library's trainer for ``config`` (OPD today; the stage-1 recipes by ``config.recipe``)."""
    from ..trainers.opd import train

    train(config)


def training_images(config) -> int:
    """Images rolled out for training over the run (every task, every round)."""
    return config.train.batch_size * config.train.grad_accum * len(config.tasks) * config.train.num_rounds


def prepare_output_dir(path: str) -> None:
    """Create ``path``; replace it only when an earlier demo wrote it (else refuse in one line)."""
    if os.path.isdir(path) and os.listdir(path):
        if not os.path.isfile(os.path.join(path, MARKER)):
            raise ConfigError(f"--output_dir {path}: the folder exists and was not written by the demo; choose "
                              "another folder or remove it yourself")
        print(f"[demo] replacing the previous demo outputs in {path}")
        shutil.rmtree(path)
    os.makedirs(path)
    open(os.path.join(path, MARKER), "w").close()


def final_checkpoint(run_dir: str) -> str:
    return ckpt.list_checkpoints(run_dir)[-1][1]


def export_teacher(demo: Demo, task: str, run: dict) -> None:
    """The teacher run's last student LoRA -> ``teachers/<task>`` (the path OPD's config reads)."""
    out = demo.path("teachers", task)
    os.makedirs(out, exist_ok=True)
    shutil.copy(os.path.join(final_checkpoint(run["run_dir"]), "pytorch_lora_weights.safetensors"), out)


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
    """Multi-task RL and cascade RL from the same base, given the OPD pipeline's training images."""
    budget = sum(m["images"] for k, m in demo.methods.items() if m["kind"] == "teacher" or k == "opd")
    for name, label in (("multitask", "multi-task RL"), ("cascade", "cascade RL")):
        config = demo.config(name)
        rounds = max(1, round(budget / (training_images(config) / config.train.num_rounds)))
        demo.train(name, "baseline", label, **{"train.num_rounds": rounds})


# ----------------------------------------------------------------------------------- measurements
def measure(demo: Demo) -> dict:
    """Rewards of every model, the convergence curves, the gradient variance (all fixed seeds)."""
    from ..models import build_policy

    guidance = _demo_configs().GUIDANCE
    config = demo.config("opd")
    policy = build_policy(config.model.path, lora=dict(rank=config.lora.rank, alpha=config.lora.alpha,
                                                       target_modules=list(config.lora.target_modules)),
                          teachers=[dict(name=t, path=demo.path("teachers", t)) for t in world.TASKS])
    evaluation = dict(num_steps=config.sample.num_steps, guidance_scale=guidance, seed=demo.seed)
    start = time.perf_counter()
    variance = gradient_variance(policy, {t: t for t in world.TASKS},
                                 trajectories_per_task=demo.profile.variance_trajectories,
                                 num_steps=config.sample.num_steps, train_steps=config.train.num_train_steps,
                                 noise_level=_demo_configs().opd_sde().sample.noise_level, guidance_scale=guidance,
                                 reduction=config.train.loss_reduction, seed=demo.seed)
    demo.timings["gradient variance"] = time.perf_counter() - start

    start = time.perf_counter()
    methods = {"base": dict(kind="base", label="base (pretrained)", seconds=demo.timings["base pretraining"],
                            images=0, rewards=task_rewards(policy, "base", samples_per_prompt=demo.profile.samples_per_prompt,
                                                           **evaluation))}
    for task in world.TASKS:
        m = demo.methods[f"teacher_{task}"]
        methods[f"teacher_{task}"] = dict(m, rewards=task_rewards(policy, task, samples_per_prompt=demo.profile.samples_per_prompt,
                                                                  **evaluation))
    for name, m in demo.methods.items():
        per_round = _seconds_per_round(m["run_dir"])
        curve = [dict(seconds=m["offset"] + sum(per_round[:r]),
                      rewards=checkpoint_rewards(policy, path, samples_per_prompt=1, **evaluation))
                 for r, path in ckpt.list_checkpoints(m["run_dir"])]
        methods.setdefault(name, dict(m))["curve"] = curve
        if "rewards" not in methods[name]:  # teachers were scored above, as loaded adapters
            methods[name]["rewards"] = checkpoint_rewards(policy, final_checkpoint(m["run_dir"]),
                                                          samples_per_prompt=demo.profile.samples_per_prompt, **evaluation)
    demo.timings["evaluation"] = time.perf_counter() - start
    for m in methods.values():
        m.pop("run_dir", None)
    order = ["base", *(f"teacher_{t}" for t in world.TASKS), "opd", "multitask", "cascade", "opd_sde", "opd_ppo"]
    methods = {k: methods[k] for k in order if k in methods}
    samples = sample_grid_images(demo, policy, methods, evaluation)
    results = dict(profile=demo.profile.name, seed=demo.seed, machine=_machine(), setup=SETUP,
                   command=f"python scripts/demo.py{' --quick' if demo.profile.quick else ''} --seed {demo.seed}",
                   eval=dict(num_steps=config.sample.num_steps, guidance_scale=guidance,
                             samples=sum(len(p) for _, p in world.TASKS.values()) * demo.profile.samples_per_prompt),
                   methods=methods, variance=variance, timings=dict(demo.timings))
    results["claims"] = report.check_claims(results)
    return results, samples


def _seconds_per_round(run_dir: str) -> list[float]:
    rows = [r for r in read_metrics(run_dir) if "seconds_per_round" in r]
    return [r["seconds_per_round"] for r in sorted(rows, key=lambda r: r["round"])]


def sample_grid_images(demo: Demo, policy, methods: dict, evaluation: dict):
    """Rows of images for samples.png: base, teachers, then every student / baseline."""
    from safetensors.torch import load_file

    kw = dict(num_steps=evaluation["num_steps"], guidance_scale=evaluation["guidance_scale"], seed=demo.seed)
    rows, labels = [], []
    for name, m in methods.items():
        if m["kind"] in ("base", "teacher"):
            adapter = "base" if name == "base" else name.removeprefix("teacher_")
        else:
            state = load_file(os.path.join(final_checkpoint(demo.path("runs", name)), "student_raw.safetensors"))
            policy.load_student_state_dict(state)
            adapter = "student"
        rows.append(sample_grid(policy, [adapter], SAMPLE_PROMPTS, **kw)[0])
        labels.append(m["label"])
    return rows, labels


def _machine() -> str:
    return f"{platform.machine()} CPU, {os.cpu_count()} cores visible, torch {torch.__version__}, 1 thread per run"


def write_outputs(demo: Demo, results: dict, samples) -> str:
    with open(demo.path("results.json"), "w") as f:
        json.dump(results, f, indent=1)
    report.plot_convergence(results, demo.path("convergence.png"))
    report.plot_samples(*samples, SAMPLE_PROMPTS, demo.path("samples.png"))
    path = demo.path("report.md")
    with open(path, "w") as f:
        f.write(report.report_markdown(results))
    return path


def run_demo(output_dir: str = "outputs/demo", profile: str = "full", seed: int = 0, progress: bool = True) -> dict:
    """Everything, top to bottom; returns the results (also in ``<output_dir>/results.json``)."""
    torch.set_num_threads(1)
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
