"""The speed levers change how a round runs, never its gradient (tiny SD3, CPU, fp32).

Every lever (and the combinations) against today's fused round, for ODE and SDE rollouts, with
one teacher serving both tasks and with two teachers; and a resume with the levers on is
bit-identical to the uninterrupted run. Policies are built once per kind and shared by the runs
(``Run(policy=...)``); the student's weights are reset to the same values before every run.
"""
import os

import pytest
import torch
from safetensors.torch import load_file

from diffusion_opd.config import load_config
from diffusion_opd.trainers.loop import build_policy_from_config, make_accelerator
from diffusion_opd.trainers.opd import OPD
from diffusion_opd.trainers.run import Run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "config", "opd.py") + ":tiny_mopd"
SMALL = ["eval.every=0", "logging.progress=false", "sample.num_steps=3", "train.num_train_steps=2"]

SCENARIOS = {
    "ode-2teachers": [],
    "ode-1teacher": ["tasks.signs.teacher=teacher_a"],
    "sde-2teachers": ["sample.noise_level=0.7", "train.loss=kl"],
    "sde-1teacher": ["sample.noise_level=0.7", "train.loss=kl", "tasks.signs.teacher=teacher_a"],
}
# lever -> (config overrides, which policy it runs on)
LEVERS = {
    "lockstep": (["perf.lockstep_tasks=true"], "plain"),
    "merge_teachers": ([], "merged"),
    "compile": ([], "compiled"),
    "lockstep+merge+phase_times": (["perf.lockstep_tasks=true", "logging.phase_times=true"], "merged"),
    "lockstep+compile": (["perf.lockstep_tasks=true"], "compiled"),
}
POLICY_KINDS = {
    "plain": [],
    "merged": ["perf.merge_teachers=true"],
    "compiled": ["perf.compile=on", "perf.compile_backend=eager"],  # dynamo capture + guards, no codegen
}


def config(out, *overrides):
    return load_config(TINY, [f"output_dir={out}", *SMALL, *overrides])


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    """One policy per kind; the builtin tiny model and teachers are written once and shared."""
    root = tmp_path_factory.mktemp("levers")
    built = {}
    for kind, overrides in POLICY_KINDS.items():
        c = config(root / "models", *overrides)
        built[kind] = build_policy_from_config(c, make_accelerator(c))
    return built


def reset_student(policy):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)  # non-zero B: every LoRA matrix gets a gradient
            p.grad = None


def round_grads(policy, out, *overrides):
    reset_student(policy)
    run = Run(config(out, *overrides), policy=policy)
    recipe = OPD(run)
    metrics = recipe.backward(1, recipe.draw(1))
    return [p.grad.detach().clone() for p in run.params], metrics


@pytest.fixture(scope="module")
def baselines(policies, tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines")
    return {name: round_grads(policies["plain"], root / name, *overrides) for name, overrides in SCENARIOS.items()}


@pytest.mark.parametrize("lever", list(LEVERS))
def test_every_lever_gives_todays_gradient(lever, policies, baselines, tmp_path):
    """Same prompts, seeds and loss weights; only batching, kernels and weight layout change, so
    the differences are fp32 re-association (merged weights W + sBA round once more; lockstep
    sums the tasks' gradients in one backward). Observed <= 1e-5 relative; bound 1e-4."""
    overrides, kind = LEVERS[lever]
    for name, scenario in SCENARIOS.items():
        want, want_metrics = baselines[name]
        got, metrics = round_grads(policies[kind], tmp_path / name, *scenario, *overrides)
        worst = max(((g - w).abs().max() / w.abs().max().clamp_min(1e-12)).item() for g, w in zip(got, want))
        print(f"{lever} / {name}: worst relative gradient difference {worst:.2e}")
        assert worst < 1e-4, (lever, name, worst)
        assert metrics.keys() == want_metrics.keys()  # the same per-task / per-step losses are logged
        for key, value in want_metrics.items():
            assert metrics[key] == pytest.approx(value, rel=1e-4), (lever, name, key)


def test_compiled_round_does_not_recompile_after_warm_up(policies, tmp_path):
    """A second round (student with grad and without, both teachers, lockstep and per-task
    batches) reuses every graph the first one compiled."""
    from torch._dynamo.utils import counters

    for i in range(2):
        for lockstep in ("false", "true"):
            round_grads(policies["compiled"], tmp_path / f"r{i}{lockstep}", *SCENARIOS["sde-2teachers"],
                        f"perf.lockstep_tasks={lockstep}")
        if i == 0:
            warm = (counters["frames"]["ok"], counters["stats"]["unique_graphs"])
    assert warm[1] > 0 and (counters["frames"]["ok"], counters["stats"]["unique_graphs"]) == warm


def test_resume_with_levers_is_bit_identical(policies, tmp_path):
    """Three rounds straight vs two rounds, a new run resuming from the checkpoint, one more round
    (lockstep tasks + merged teachers + phase times, EMA on): the same student and EMA bits."""
    levers = ["perf.lockstep_tasks=true", "logging.phase_times=true", "train.ema_decay=0.9", "train.num_rounds=3",
              "save_every=1", "keep_last=5", *SCENARIOS["sde-2teachers"]]
    pol = policies["merged"]

    def train(out, *extra):
        reset_student(pol)
        run = Run(config(out, *levers, *extra), policy=pol)
        return run.train(OPD(run))

    train(tmp_path / "full")
    train(tmp_path / "split", "train.stop_after_round=2")
    train(tmp_path / "split", "resume_from=latest")
    for name in ("student_raw.safetensors", "ema/pytorch_lora_weights.safetensors"):
        a = load_file(str(tmp_path / "full" / "checkpoints" / "round-3" / name))
        b = load_file(str(tmp_path / "split" / "checkpoints" / "round-3" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
