"""Run by tests/trainers/test_stage1_fidelity.py under `torchrun --nproc_per_node 2` (real gloo):
each rank backpropagates its share of a stage-1 update with the recipes' normalisation
(trainers/rl.py update_scale) and averages gradients as the trainer does (trainers/setup.py
all_reduce_gradients); rank r writes its gradient and logged loss to <out>/grad<r>.pt."""
import os
import sys
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from diffusion_opd.trainers.rl import global_loss, update_scale  # noqa: E402

SAMPLES = torch.arange(24, dtype=torch.float32).reshape(8, 3) / 10  # one feature row per sample
KEEP = torch.tensor([1, 1, 1, 0, 1, 0, 0, 0], dtype=torch.float32)  # rank 0 keeps 3 of 4, rank 1 keeps 1
STEPS = 2  # trained steps per sample
W0 = torch.tensor([0.5, -1.0, 2.0])


def backward_share(run, rows):
    """The update over ``rows`` in micro-batches of 2: per sample and step the loss (a_i . w) keep_i."""
    w = torch.nn.Parameter(W0.clone())
    part = [(SimpleNamespace(keep=KEEP[rows[i:i + 2]]), [0, 1]) for i in range(0, len(rows), 2)]
    scale, _ = update_scale(run, part, STEPS)
    local = torch.zeros(())
    for (g, _), start in zip(part, range(0, len(rows), 2)):
        for _ in range(STEPS):
            losses = (SAMPLES[rows[start:start + 2]] @ w) * g.keep
            (losses.sum() * scale).backward()
            local = local + losses.detach().sum() * scale
    return w, local


def one_process_gradient():
    w, _ = backward_share(SimpleNamespace(world=1, accelerator=None), list(range(8)))
    return w.grad


if __name__ == "__main__":
    from accelerate import Accelerator

    from diffusion_opd.trainers.setup import all_reduce_gradients

    acc = Accelerator(cpu=True)
    assert acc.num_processes == 2, acc.num_processes
    run = SimpleNamespace(world=2, accelerator=acc)
    rows = list(range(4 * acc.process_index, 4 * acc.process_index + 4))
    w, local = backward_share(run, rows)
    loss = global_loss(run, local)
    all_reduce_gradients([w], acc)
    torch.save({"grad": w.grad, "loss": loss, "w": W0}, os.path.join(sys.argv[1], f"grad{acc.process_index}.pt"))
