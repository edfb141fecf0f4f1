"""Base pretraining of the toy model: plain conditional flow matching on the world's base data.

``x_sigma = (1 - sigma) x0 + sigma eps``, target velocity ``eps - x0``, sigma drawn from a
logit-normal (as SD3 trains), captions encoded by the model's own bag-of-words embedding, which
trains here and is frozen afterwards (it is the text encoder of every later stage).
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..models.toy import EMPTY, UNKNOWN, ToyDenoiser, save_toy_model
from ..data import toy_world as world


def pretrain_base(directory: str, *, steps: int, batch_size: int = 256, dataset_size: int = 20000,
                  learning_rate: float = 2e-3, width: int = 128, depth: int = 3, seed: int = 0,
                  progress: bool = True) -> list[float]:
    """Train a :class:`ToyDenoiser` from scratch and save it to ``directory``; returns the loss
    of every step (deterministic under ``seed``). Runs on one thread: for a model this small,
    more threads only add contention (measured: 40x slower with 2 threads on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _pretrain(directory, steps, batch_size, dataset_size, learning_rate, width, depth, seed, progress)
    finally:
        torch.set_num_threads(threads)


def _pretrain(directory, steps, batch_size, dataset_size, learning_rate, width, depth, seed, progress) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    images, captions = world.sample_base_data(dataset_size, generator)
    model = ToyDenoiser([EMPTY, UNKNOWN, *world.vocabulary()], width=width, depth=depth)
    index = {w: i for i, w in enumerate(model.vocab)}
    tokens = [[index.get(w, index[UNKNOWN]) for w in world.tokenize(c)] or [index[EMPTY]] for c in captions]
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps,
                                                   pct_start=max(0.05, 2.5 / steps))
    losses = []
    for _ in tqdm(range(steps), desc="base pretraining", disable=not progress, leave=False):
        idx = torch.randint(dataset_size, (batch_size,), generator=generator)
        x0 = images[idx]
        eps = torch.randn(x0.shape, generator=generator)
        sigma = torch.sigmoid(torch.randn(batch_size, generator=generator))
        s = sigma[:, None, None, None]
        text = model.embed_text([tokens[i] for i in idx.tolist()])
        loss = ((model((1 - s) * x0 + s * eps, sigma, text) - (eps - x0)) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    save_toy_model(model, directory)
    return losses
