"""Run by tests/trainers/test_sharding.py under `torchrun --nproc_per_node 2` (real gloo).

    fsdp_worker.py OUT STRATEGY CASE [CASE ...]

For each CASE (a name from CASES: the config and overrides of one OPD / stage-1 round) the
worker builds the run under ``distributed.strategy=STRATEGY``, starts the student from the same
seeded random weights on every process (non-zero lora_B, so every LoRA matrix gets a gradient),
runs ONE round's backward(s) and writes, on rank 0, ``OUT/<case>.pt``: the student's gradient
averaged over processes (gathered to full tensors), the round's loss, how many reduce-scatter
collectives ran during the round, how many backwards and optimizer steps it had, how many shard
groups hold student parameters, and the parameter bytes each rank holds vs the whole backbone.
OPD cases also record every process's prompt embeddings of the round, the text-encoder bytes
each process holds (and their full size) and the merged-teacher weight bytes each holds.
Stage-1 cases record the gradient of the round's last optimizer step.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from diffusion_opd.config import load_config  # noqa: E402
from diffusion_opd.trainers import sharding  # noqa: E402
from diffusion_opd.trainers.setup import all_reduce_gradients  # noqa: E402

TINY = ["eval.every=0", "logging.progress=false", "train.num_rounds=2", "expect_world_size=2"]
CASES = {  # name -> (config, overrides, keep only the first task)
    "ode": ("config/opd.py:tiny_mopd", [], False),
    "ode_lockstep": ("config/opd.py:tiny_mopd", ["perf.lockstep_tasks=true"], False),
    "sde": ("config/opd.py:tiny_mopd", ["sample.noise_level=0.7", "train.loss=kl"], False),
    "sde_lockstep": ("config/opd.py:tiny_mopd", ["sample.noise_level=0.7", "train.loss=kl",
                                                 "perf.lockstep_tasks=true"], False),
    "ode_one_teacher": ("config/opd.py:tiny_mopd", [], True),
    "sde_one_teacher": ("config/opd.py:tiny_mopd", ["sample.noise_level=0.7", "train.loss=kl"], True),
    "two_pass": ("config/opd.py:tiny_mopd", ["train.mode=two_pass", "train.grad_accum=2", "train.batch_size=1"],
                 False),
    "flux": ("config/opd.py:tiny_flux_mopd", ["perf.lockstep_tasks=true", "model.max_sequence_length=16"], False),
    # distributed.text_encoders (compared with "ode" / "flux": replicate) and merged teachers
    "text_shard": ("config/opd.py:tiny_mopd", ["distributed.text_encoders=shard"], False),
    "text_rank0": ("config/opd.py:tiny_mopd", ["distributed.text_encoders=rank0"], False),
    "flux_text_shard": ("config/opd.py:tiny_flux_mopd", ["perf.lockstep_tasks=true", "model.max_sequence_length=16",
                                                         "distributed.text_encoders=shard"], False),
    "flux_text_rank0": ("config/opd.py:tiny_flux_mopd", ["perf.lockstep_tasks=true", "model.max_sequence_length=16",
                                                         "distributed.text_encoders=rank0"], False),
    "merged_lockstep": ("config/opd.py:tiny_mopd", ["perf.merge_teachers=true", "perf.lockstep_tasks=true"], False),
    # a full-transformer teacher (a separate copy, sharded like the backbone): the folder the test
    # writes and names in OPD_FULL_TEACHER
    "full_teacher": ("config/opd.py:tiny_mopd", ["teachers.teacher_b.kind=transformer",
                                                 f"teachers.teacher_b.path={os.environ.get('OPD_FULL_TEACHER', '')}"],
                     False),
    # Wan 2.2 A14B's two experts: the high-noise one sits out the round's last (low-noise) backwards
    "wan22": ("config/opd.py:tiny_wan22_t2v_mopd", ["perf.lockstep_tasks=true"], False),
    "nft": ("config/nft.py:tiny", ["rl.groups_per_round=1", "rl.group_size=4", "train.batch_size=2"], False),
    "grpo_guard": ("config/grpo.py:tiny_guard", ["rl.groups_per_round=1", "rl.group_size=4", "train.batch_size=2"],
                   False),
}


def student_start(policy) -> dict:
    """Seeded random student weights (the same on every process)."""
    gen = torch.Generator().manual_seed(1234)
    return {k: 0.1 * torch.randn(v.shape, generator=gen) for k, v in policy.student_state_dict().items()}


class Counter:
    """Counts the reduce-scatter collectives FSDP2 issues (it calls dist.reduce_scatter_single)."""

    def __init__(self):
        self.count, self.original = 0, dist.reduce_scatter_single

    def __call__(self, *args, **kwargs):
        self.count += 1
        return self.original(*args, **kwargs)


def everyone(obj) -> list:
    """``obj`` of every process, in rank order."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def main(out, strategy, cases):
    from diffusion_opd.trainers.nft import NFT
    from diffusion_opd.trainers.grpo import GRPO
    from diffusion_opd.trainers.opd import OPD
    from diffusion_opd.trainers.run import Run

    counter = Counter()
    dist.reduce_scatter_single = counter
    for case in cases:
        spec, overrides, single = CASES[case]
        config = load_config(os.path.join(ROOT, spec), [f"output_dir={os.path.join(out, strategy, case)}",
                                                        f"distributed.strategy={strategy}", *TINY, *overrides])
        if single:  # one task, one teacher
            first = next(iter(config.tasks))
            config.tasks = {first: config.tasks[first]}
            config.teachers = {config.tasks[first].teacher: config.teachers[config.tasks[first].teacher]}
        run = Run(config)
        run.policy.load_student_state_dict(student_start(run.policy))
        recipe = {"opd": OPD, "nft": NFT, "grpo": GRPO}[config.recipe](run)
        run.shard(recipe)
        names = [n for n, p in run.policy.transformer.named_parameters() if p.requires_grad]
        counts = {"backwards": 0, "steps": 1 if config.recipe == "opd" else 0}

        def backward(loss, original=run.backward):
            counts["backwards"] += 1
            original(loss)

        run.backward = backward
        counter.count = 0
        embeds = None
        if config.recipe == "opd":
            batches = recipe.draw(1)
            embeds = everyone({t: {k: v.detach().cpu() for k, v in {**e.cond, **{f"uncond/{k}": u for k, u in
                                                                                 e.uncond.items()}}.items()}
                               for t, (e, _) in batches.items()})
            loss = recipe.backward(1, batches)["loss"]
            if run.sync is None:
                all_reduce_gradients(run.params, run.accelerator)
            grads = sharding.gather([p.grad for p in run.params])
        else:  # stage 1: one optimizer step's backwards (updates_per_round=1), then the step
            captured = {}
            step = run.optimizer_step

            def capture(round_idx, loss, step=step):
                if run.sync is None:
                    all_reduce_gradients(run.params, run.accelerator)
                else:
                    run.sync.check()
                captured["grads"] = sharding.gather([p.grad for p in run.params])
                captured["loss"] = loss
                counts["steps"] += 1
                return step(round_idx, loss)

            run.optimizer_step = capture
            recipe.round(1)
            grads, loss = captured["grads"], captured["loss"]
        collectives = counter.count
        groups = 0
        local, full = sharding.local_bytes(run.policy.transformer)
        if run.sync is not None:  # shard groups that hold student parameters (FSDP2's own bookkeeping)
            from torch.distributed.fsdp import FSDPModule

            for m in run.policy.transformer.modules():
                group = m._get_fsdp_state()._fsdp_param_group if isinstance(m, FSDPModule) else None
                groups += bool(group and any(fp.sharded_param.requires_grad for fp in group.fsdp_params))
        encoders = run.policy.text_encoder_modules()
        text = [sharding.local_bytes(m) for m in encoders]
        from torch.distributed.fsdp import FSDPModule

        from diffusion_opd.models.compile import nested_repeated_blocks

        text_groups = (sum(isinstance(m, FSDPModule) for e in encoders for m in e.modules()),
                       sum(len(nested_repeated_blocks(e)) + 1 for e in encoders), len(encoders))
        text_bytes = everyone((sum(a for a, _ in text), sum(b for _, b in text)))
        merged = [(t.to_local() if hasattr(t, "to_local") else t) for n, t in
                  (*run.policy.transformer.named_parameters(), *run.policy.transformer.named_buffers())
                  if "_opd_merged_" in n]
        merged_bytes = everyone(sum(t.numel() * t.element_size() for t in merged))
        copies = [sharding.local_bytes(m) for m in run.policy.denoiser_modules()[1:]]  # full-transformer teachers
        teacher_bytes = (sum(a for a, _ in copies), sum(b for _, b in copies))
        if run.rank == 0:
            torch.save({"grads": [g.detach().cpu() for g in grads], "names": names, "loss": loss,
                        "embeds": embeds, "text_bytes": text_bytes, "text_groups": text_groups, "merged_bytes": merged_bytes,
                        "merged_full": sum(run.policy.merged_teacher_bytes.values()),
                        "collectives": collectives, "groups": groups, "local_bytes": local, "full_bytes": full,
                        "teacher_bytes": teacher_bytes, "world": run.world, **counts},
                       os.path.join(out, f"{strategy}-{case}.pt"))
        run.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
    # a clean exit: both processes leave together (rank 0 still writing while rank 1 tore its gloo
    # connections down aborted rank 1 once under load: "terminate called without an active
    # exception"), with gloo's threads stopped before the interpreter ends
    dist.barrier()
    dist.destroy_process_group()
