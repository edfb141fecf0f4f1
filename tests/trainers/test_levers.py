"""The speed levers change how a round runs, never its gradient (tiny SD3, CPU, fp32).

Every lever (and the combinations) against today's fused round, for ODE and SDE rollouts, with
one teacher serving both tasks and with two teachers; and a resume with the levers on is
bit-identical to the uninterrupted run. Policies are built once per kind and shared by the runs
(``Run(policy=...)``); the student's weights are reset to the same values before every run.
"""
import os
import traceback

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from diffusion_opd.config import load_config
from diffusion_opd.trainers.metrics import PhaseTimer
from diffusion_opd.trainers.setup import build_policy_from_config, make_accelerator
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


class BlockingOps(TorchDispatchMode):
    """Counts the ops that, on a CUDA device, make the host wait for the device's queue: scalar
    reads (``.item()``, ``bool(t)``, ``float(t)``), tensors built from Python data
    (``torch.tensor`` / ``torch.as_tensor``: a copy from pageable host memory) and
    data-dependent shapes. Run on the CPU, the same code path dispatches the same ops, so this
    is the fake device's sync counter; ``torch.cuda.synchronize`` itself is counted separately."""

    BLOCKING = {"_local_scalar_dense", "lift_fresh", "lift_fresh_copy", "nonzero", "masked_select", "unique_dim",
                "_unique2"}

    def __init__(self):
        super().__init__()
        self.found, self.paused = [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.BLOCKING and not self.paused:
            where = [f"{os.path.basename(f.filename)}:{f.lineno}" for f in traceback.extract_stack()
                     if "diffusion_opd" in f.filename][-2:]
            self.found.append((name, *where))
        return func(*args, **(kwargs or {}))


def test_the_blocking_ops_counter_sees_what_blocks():
    """The counter can fail: the patterns finding 6 removed are counted."""
    x = torch.ones(3)
    with BlockingOps() as ops:
        torch.as_tensor(0.5, dtype=torch.float32, device=x.device)  # what sampling.py did per transition
        x[[0, 2]]  # an index list
        bool((x == 0).any())
        torch.full((3,), 0.5)  # does not block: the value is a kernel argument
        x * 0.5
    assert [f[0] for f in ops.found] == ["lift_fresh", "lift_fresh", "_local_scalar_dense"]


@pytest.mark.parametrize("lever", ["fused", "lockstep", "lockstep+merge"])
def test_round_hot_path_never_waits_for_the_device(lever, policies, tmp_path, monkeypatch):
    """The round's hot path (rollout, teacher queries, losses, backward for every task and step;
    ODE and SDE, two teachers mixed in one forward) contains no op that blocks the host, and no
    CUDA synchronisation: the only waits are the one reduction of the logged losses and the
    gradient-norm read of the optimizer step, once per round (outside what is counted here).
    (Compiled blocks run the same ops; torch.compile refuses to run under a dispatch mode.)"""
    syncs = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: syncs.append(a))
    kind = {"fused": "plain", "lockstep": "plain", "lockstep+merge": "merged"}[lever]
    overrides = [] if lever == "fused" else ["perf.lockstep_tasks=true"]
    pol = policies[kind]
    for name in ("ode-2teachers", "sde-2teachers"):
        reset_student(pol)
        run = Run(config(tmp_path / name, *SCENARIOS[name], *overrides), policy=pol,
                  timer=PhaseTimer(torch.device("cuda"), enabled=False))  # as on a GPU, logging.phase_times off
        recipe = OPD(run)
        batches = recipe.draw(1)
        reduce = run.mean_over_processes
        counter = BlockingOps()

        def reduce_once(*args, **kwargs):  # the round's one wait, for its logged losses
            counter.paused = True
            try:
                return reduce(*args, **kwargs)
            finally:
                counter.paused = False

        monkeypatch.setattr(run, "mean_over_processes", reduce_once)
        with counter:
            recipe.backward(1, batches)
        assert counter.found == [], (lever, name, counter.found[:5])
    assert syncs == []
