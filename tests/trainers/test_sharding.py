"""distributed.strategy=fsdp (trainers/sharding.py): FSDP2 over two real gloo processes gives the
DDP gradient, holds half the backbone per process, reduces once per optimizer step, and its
checkpoints resume exactly, also across strategies. Bad combinations are one-line errors."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from diffusion_opd.config import load_config
from diffusion_opd.errors import ConfigError
from diffusion_opd.trainers import sharding
from diffusion_opd.trainers.metrics import read_metrics

from tests.processes import ROOT, free_port

TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"


def torchrun(script, *args, env=None):
    cmd = [TORCHRUN, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           f"tests/trainers/{script}", *args]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def round_pair(out, cases, env=None):
    """One round of every case under ddp and under fsdp (two launches, each running every case)."""
    for strategy in ("ddp", "fsdp"):
        torchrun("fsdp_worker.py", str(out), strategy, *cases, env=env)
    return {c: tuple(torch.load(out / f"{s}-{c}.pt") for s in ("ddp", "fsdp")) for c in cases}


def check_round(ddp, fsdp):
    assert ddp["names"] == fsdp["names"] and len(ddp["grads"]) == len(fsdp["grads"]) > 0
    for name, a, b in zip(ddp["names"], ddp["grads"], fsdp["grads"]):
        # rtol 1e-5 per element; atol: fp32 round-off of the sums (1e-6 of the tensor's largest entry)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 * float(a.abs().max()), msg=name)
    assert sum(int((g != 0).sum()) for g in ddp["grads"]) > 0.9 * sum(g.numel() for g in ddp["grads"])
    assert fsdp["loss"] == pytest.approx(ddp["loss"], rel=1e-6)
    # half of the backbone's (and every adapter's) bytes on each of the 2 processes, up to the
    # padding of odd first dimensions
    assert fsdp["full_bytes"] == ddp["full_bytes"] and ddp["local_bytes"] == ddp["full_bytes"]
    assert abs(fsdp["local_bytes"] / fsdp["full_bytes"] - 0.5) < 0.01, (fsdp["local_bytes"], fsdp["full_bytes"])
    # one reduce-scatter per shard group holding student parameters per optimizer step, however many
    # backwards the step had (the round has num_train_steps x micro-batches of them); none under ddp
    assert fsdp["groups"] >= 2 and ddp["collectives"] == 0
    assert fsdp["collectives"] == fsdp["groups"] * fsdp["steps"], (fsdp["collectives"], fsdp["groups"])
    assert fsdp["backwards"] > fsdp["steps"]


def test_fsdp_opd_round_equals_ddp(tmp_path):
    """ODE with two teachers one by one, SDE with mixed-teacher (lockstep) batches."""
    for case, (ddp, fsdp) in round_pair(tmp_path, ["ode", "sde_lockstep"]).items():
        check_round(ddp, fsdp)


@pytest.mark.slow
def test_fsdp_round_equals_ddp_every_variant(tmp_path):
    """The rest of the matrix: SDE one by one, ODE lockstep, one teacher (ODE, SDE), two_pass with
    gradient accumulation, tiny FLUX (double and single blocks), DiffusionNFT (old-policy adapter)
    and GRPO-Guard (two optimizer steps per round)."""
    cases = ["sde", "ode_lockstep", "ode_one_teacher", "sde_one_teacher", "two_pass", "flux", "nft", "grpo_guard"]
    for case, (ddp, fsdp) in round_pair(tmp_path, cases).items():
        check_round(ddp, fsdp)


@pytest.mark.slow
def test_text_encoder_placements_and_merged_teachers_give_the_same_round(tmp_path):
    """distributed.text_encoders = shard / rank0 give the prompt embeddings and the student's
    gradient of replicate (tiny SD3 and tiny FLUX; rank0 also under ddp) while rank 1 holds half /
    none of the text encoders; merged teachers under fsdp (mixed-teacher lockstep batches) give
    the adapter-switched teachers' gradient while every process holds half of the merged weights."""
    fsdp_cases = ["ode", "text_shard", "text_rank0", "merged_lockstep", "flux", "flux_text_shard", "flux_text_rank0"]
    torchrun("fsdp_worker.py", str(tmp_path), "fsdp", *fsdp_cases)
    torchrun("fsdp_worker.py", str(tmp_path), "ddp", "ode", "text_rank0")
    r = {f"{s}-{c}": torch.load(tmp_path / f"{s}-{c}.pt") for s, cases in (("fsdp", fsdp_cases), ("ddp", ["ode", "text_rank0"]))
         for c in cases}
    for reference, case in (("fsdp-ode", "fsdp-text_shard"), ("fsdp-ode", "fsdp-text_rank0"), ("ddp-ode", "ddp-text_rank0"),
                            ("fsdp-flux", "fsdp-flux_text_shard"), ("fsdp-flux", "fsdp-flux_text_rank0")):
        a, b = r[reference], r[case]
        # Exact (tolerance 0): the encoders compute with the same weights (all-gathered copies of the
        # loaded ones, no mixed precision) on one prompt per forward (models/diffusers_policy.py), so
        # every embedding row, hence every rollout and gradient, is the same float for float.
        assert len(a["embeds"]) == len(b["embeds"]) == 2
        for rank in range(2):
            assert a["embeds"][rank].keys() == b["embeds"][rank].keys()
            for task, tensors in a["embeds"][rank].items():
                assert all(torch.equal(v, b["embeds"][rank][task][k]) for k, v in tensors.items()), (case, rank, task)
        assert a["names"] == b["names"] and all(torch.equal(x, y) for x, y in zip(a["grads"], b["grads"])), case
        assert a["loss"] == b["loss"]
        # text-encoder bytes held per process: replicate whole on both, rank0 whole / none, shard ~half each
        (full, _), text = a["text_bytes"][0], b["text_bytes"]
        assert full > 0 and a["text_bytes"] == [(full, full), (full, full)]
        if case.endswith("rank0"):
            assert text == [(full, full), (0, 0)], (case, text)
        else:
            assert all(f == full and abs(local / full - 0.5) < 0.01 for local, f in text), (case, text)
            assert sum(local for local, _ in text) >= full
            # one shard group per encoder layer (>= 2 each), plus each encoder's root
            groups, expected, encoders = b["text_groups"]
            assert groups == expected >= 3 * encoders >= 6, b["text_groups"]
    # merged teachers, mixed in lockstep batches, vs LoRA teachers queried one by one (both fsdp).
    # Not exact: a merged layer computes (W + sBA) x where the adapter computes Wx + sB(Ax); the two
    # differ by fp32 rounding (measured: 9e-12 absolute on gradients of up to 2.7e-5), far inside
    # the rtol 1e-5 of the ddp comparison.
    merged, ode = r["fsdp-merged_lockstep"], r["fsdp-ode"]
    for name, a, b in zip(ode["names"], ode["grads"], merged["grads"]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 * float(a.abs().max()), msg=name)
    assert merged["loss"] == pytest.approx(ode["loss"], rel=1e-6)
    assert ode["merged_full"] == 0 and ode["merged_bytes"] == [0, 0]
    assert merged["merged_full"] > 0 and all(b == merged["merged_full"] // 2 for b in merged["merged_bytes"])
    assert abs(merged["local_bytes"] / merged["full_bytes"] - 0.5) < 0.01  # the whole backbone, merged copies too


@pytest.mark.slow
def test_fsdp_full_transformer_teacher_is_a_sharded_copy(tmp_path):
    """A full-transformer teacher (kind=transformer) under fsdp: its own copy, cut in half like
    the backbone, and the student's gradient of ddp."""
    import diffusers

    from diffusion_opd.models.tiny import TINY_BUILDERS

    base = TINY_BUILDERS["tiny-sd3"](str(tmp_path / "base"), seed=0)  # the run's builtin:tiny-sd3
    teacher = diffusers.SD3Transformer2DModel.from_pretrained(base, subfolder="transformer")
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(1.05)
    teacher.save_pretrained(tmp_path / "full")
    ddp, fsdp = round_pair(tmp_path, ["full_teacher"], env={"OPD_FULL_TEACHER": str(tmp_path / "full")})["full_teacher"]
    check_round(ddp, fsdp)
    (local, full), (whole, whole_full) = fsdp["teacher_bytes"], ddp["teacher_bytes"]
    assert full == whole == whole_full > 0 and abs(local / full - 0.5) < 0.01, (local, full)


@pytest.mark.slow
def test_fsdp_two_expert_round_equals_ddp(tmp_path):
    """Wan 2.2 A14B's two experts under fsdp: the high-noise expert runs only in the round's first
    steps, so a reduce held for the round's last backward would never reach its gradients; a
    two-expert denoiser reduces at every backward instead (sharding.ReduceOnce). Both experts'
    LoRA gradients equal DDP's and neither is zero."""
    ddp, fsdp = round_pair(tmp_path, ["wan22"])["wan22"]
    assert ddp["names"] == fsdp["names"]
    for name, a, b in zip(ddp["names"], ddp["grads"], fsdp["grads"]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 * float(a.abs().max()), msg=name)
    for expert in ("transformer.", "transformer_2."):
        grads = [g for n, g in zip(ddp["names"], ddp["grads"]) if n.startswith(expert)]
        assert grads and sum(int((g != 0).sum()) for g in grads) > 0.9 * sum(g.numel() for g in grads), expert
    assert fsdp["loss"] == pytest.approx(ddp["loss"], rel=1e-6)
    assert abs(fsdp["local_bytes"] / fsdp["full_bytes"] - 0.5) < 0.01
    assert fsdp["collectives"] > fsdp["groups"] * fsdp["steps"]  # reduced at more than the last backward


def train(out, *overrides):
    return torchrun("ddp_worker.py", str(out), "train.num_rounds=10", "save_every=5", "eval.every=0",
                    "train.ema_decay=0.9", "expect_world_size=2", "logging.progress=false", *overrides)


def losses(out):
    return {r["round"]: r["loss"] for r in read_metrics(str(out)) if "loss" in r}


@pytest.mark.slow
def test_fsdp_resume_is_exact_and_crosses_strategies(tmp_path):
    """10 fsdp rounds == 5 + resume 5 (bit-identical student, EMA and losses); a ddp checkpoint
    resumed under fsdp and an fsdp checkpoint resumed under ddp give the next round's loss of the
    run they came from."""
    full, split, ddp = tmp_path / "full", tmp_path / "split", tmp_path / "ddp"
    train(full, "distributed.strategy=fsdp")
    train(split, "distributed.strategy=fsdp", "train.stop_after_round=5")
    train(split, "distributed.strategy=fsdp", "resume_from=latest")
    a, b = (load_file(os.path.join(d, "student_rank0.safetensors")) for d in (full, split))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ema = [load_file(os.path.join(d, "checkpoints", "round-10", "ema", "pytorch_lora_weights.safetensors"))
           for d in (full, split)]
    assert all(torch.equal(ema[0][k], ema[1][k]) for k in ema[0])
    assert losses(full) == losses(split)

    train(ddp, "train.stop_after_round=6")  # checkpoints at 5 and 6
    for source, strategy, reference in ((ddp, "fsdp", ddp), (split, "ddp", full)):
        out = tmp_path / f"to_{strategy}"
        train(out, f"distributed.strategy={strategy}", "train.stop_after_round=6",
              f"resume_from={source / 'checkpoints' / 'round-5'}")
        assert losses(out)[6] == pytest.approx(losses(reference)[6], rel=1e-6), strategy
    saved = json.load(open(full / "checkpoints" / "round-10" / "trainer_state.json"))
    assert saved["world_size"] == 2
    optimizer = torch.load(full / "checkpoints" / "round-10" / "optimizer.pt")
    shapes = {tuple(v.shape) for v in load_file(str(full / "checkpoints" / "round-10" / "student_raw.safetensors")).values()}
    assert {tuple(s["exp_avg"].shape) for s in optimizer["state"].values()} <= shapes  # gathered, full size


# -- one-line errors before anything loads ---------------------------------------------------------
def tiny(*overrides):
    return load_config(os.path.join(ROOT, "config/opd.py:tiny_mopd"), list(overrides))


@pytest.mark.parametrize("overrides, world, message", [
    (["distributed.strategy=fsdp"], 1, "distributed.strategy: fsdp shards over processes but 1 started"),
    (["distributed.strategy=fsdp", "mixed_precision=fp16", "device=cuda"], 2, "mixed_precision: fp16 with"),
    (["distributed.strategy=fsdp", "perf.compile=on"], 2, "perf.compile: on with distributed.strategy=fsdp"),
])
def test_bad_combinations_are_config_errors(overrides, world, message):
    with pytest.raises(ConfigError, match=message):
        sharding.check_strategy(tiny(*overrides), world)
    sharding.check_strategy(tiny(*overrides[1:]), world)  # the same without fsdp is fine


@pytest.mark.parametrize("strategy, environ, message", [
    ("ddp", {"ACCELERATE_USE_FSDP": "true", "ACCELERATE_MIXED_PRECISION": "no"},
     "distributed.strategy: ddp but the accelerate config launched fsdp; launch with "
     "scripts/accelerate_configs/multi_gpu.yaml or set distributed.strategy=fsdp"),
    ("fsdp", {"ACCELERATE_MIXED_PRECISION": "no"}, "distributed.strategy: fsdp but the accelerate config launched ddp"),
    ("fsdp", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1", "ACCELERATE_MIXED_PRECISION": "no"},
     "accelerate config: fsdp_version 1"),
    ("ddp", {"ACCELERATE_USE_DEEPSPEED": "true"}, "accelerate config: DeepSpeed is not supported"),
])
def test_an_accelerate_config_that_disagrees_is_refused(strategy, environ, message):
    config = tiny(f"distributed.strategy={strategy}")
    with pytest.raises(ConfigError, match=message):
        sharding.check_launch(config, dict(environ))


def test_matching_accelerate_config_is_accepted_and_accelerate_fsdp_switch_hidden():
    environ = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "ACCELERATE_MIXED_PRECISION": "no"}
    sharding.check_launch(tiny("distributed.strategy=fsdp"), environ)
    assert "ACCELERATE_USE_FSDP" not in environ  # the trainer shards; accelerate's plugin stays off
    sharding.check_launch(tiny(), {"ACCELERATE_MIXED_PRECISION": "no"})
    sharding.check_launch(tiny("distributed.strategy=fsdp"), {})  # torchrun: nothing to compare


@pytest.mark.parametrize("overrides, env, message", [
    (["distributed.strategy=fsdp"], {"WORLD_SIZE": "1"}, "error: distributed.strategy: fsdp shards over processes"),
    # the check a launched run makes, also in the dry run the launch scripts do first
    (["expect_world_size=2"], {"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"},
     "error: distributed.strategy: ddp but the accelerate config launched fsdp"),
])
def test_validate_only_refuses_a_bad_launch_in_one_line(overrides, env, message):
    result = subprocess.run([sys.executable, "scripts/train.py", "--config", "config/opd.py:tiny_mopd", *overrides,
                             "--validate_only"], cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), lines


def test_merged_teacher_weights_become_frozen_parameters_with_the_same_velocity(tiny_sd3_dir, tiny_teacher_dirs):
    """What fsdp does to merged teachers before fully_shard (which shards parameters only): each
    merged weight becomes a frozen parameter under its buffer's name, and every velocity stays
    bit-identical (the layers read it by name)."""
    from diffusion_opd.models import build_policy
    from diffusion_opd.models.lora import merged_weights_as_parameters
    from tests.models.test_fast_paths import random_embeds

    pol = build_policy(tiny_sd3_dir, teachers=[dict(name="a", path=tiny_teacher_dirs["peft"]),
                                               dict(name="b", path=tiny_teacher_dirs["diffusers"])],
                       merge_teachers=True)
    embeds = random_embeds(pol, n=2)
    x = torch.randn(2, *pol.latent_shape(64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = [pol.velocity(x, 0.6, embeds, name, 3.0) for name in ("a", "b", "student")]
        before.append(pol.velocity_mixed(x, 0.6, embeds, ["a", "b"], [3.0, 1.0]))
    merged = {n: b.numel() * b.element_size() for n, b in pol.transformer.named_buffers() if "_opd_merged_" in n}
    assert sum(merged.values()) == sum(pol.merged_teacher_bytes.values()) > 0
    student = pol.trainable_parameters()
    assert merged_weights_as_parameters(pol.transformer) == len(merged)
    assert not any("_opd_merged_" in n for n, _ in pol.transformer.named_buffers())
    params = {n: p for n, p in pol.transformer.named_parameters() if "_opd_merged_" in n}
    assert params.keys() == merged.keys() and not any(p.requires_grad for p in params.values())
    assert all(a is b for a, b in zip(student, pol.trainable_parameters()))  # the student is untouched
    assert not any("_opd_merged_" in k for k in pol.transformer.state_dict())  # never saved, as before
    assert pol.student_state_dict().keys() == pol._student_keys
    with torch.no_grad():
        after = [pol.velocity(x, 0.6, embeds, name, 3.0) for name in ("a", "b", "student")]
        after.append(pol.velocity_mixed(x, 0.6, embeds, ["a", "b"], [3.0, 1.0]))
    assert all(torch.equal(u, v) for u, v in zip(before, after))
