"""Regional compilation: ``torch.compile`` on each repeated transformer block, not the whole model.

Compiling block by block fuses the memory-bound work between the matmuls (LoRA scale and add,
AdaLN modulation, norms, casts: most of the GPU time of an SD3.5-M forward, see
docs/benchmarks.md) at a fraction of a whole-model compile's time, and it leaves the Python
code between blocks (adapter switching, CFG batching, DDP) untouched.

Adapter switching and recompilation: peft's LoRA layers read ``_active_adapter`` and
``_disable_adapters`` in their forward, so dynamo guards on them and keeps ONE graph per
(adapter, grad mode, batch shape, block variant); switching back to a seen adapter picks its
cached graph without recompiling. That is ~2 block variants x 5 adapters (student with and
without grad, 3 teachers, base) x 2 batch shapes for the released recipe: more than dynamo's
default of 8 cache entries per code object, so the limit is raised here.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["repeated_blocks", "compile_repeated_blocks", "RECOMPILE_LIMIT"]

RECOMPILE_LIMIT = 64  # graphs kept per block code object (see the module docstring)


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: the classes named in diffusers' ``_repeated_blocks`` when the
    model declares them (FLUX does), else every entry of a ModuleList child holding at least two
    modules of one class (``transformer_blocks`` of SD3, ``single_transformer_blocks``...)."""
    names = set(getattr(model, "_repeated_blocks", None) or ())
    if names:
        return [m for m in model.modules() if type(m).__name__ in names]
    blocks = []
    for child in model.children():
        if isinstance(child, torch.nn.ModuleList) and len(child) >= 2 and len({type(m) for m in child}) == 1:
            blocks.extend(child)
    return blocks


def compile_repeated_blocks(model: torch.nn.Module, backend: str = "inductor", dynamic: Optional[bool] = None) -> int:
    """``block.compile(backend=..., dynamic=...)`` for every repeated block; returns how many
    (0 for a model without repeated blocks: nothing is compiled).

    Compilation itself happens lazily at the first forward of each (adapter, grad, shape)
    combination, i.e. during the first round. ``backend="eager"`` / ``"aot_eager"`` trace without
    generating kernels (what the CPU tests use); ``"inductor"`` is the one that fuses.
    """
    import torch._dynamo

    blocks = repeated_blocks(model)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for block in blocks:
        block.compile(backend=backend, dynamic=dynamic)
    return len(blocks)
