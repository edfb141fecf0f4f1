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

Shapes are static by default (``dynamic=False``): dynamo's own default (``None``) turns a block
dynamic at the first new batch size (the 3-row CFG-1.0 teacher after 6-row forwards), trading
the fused, shape-specialised kernels for symbolic ones. Blocks compile with ``fullgraph=True``:
a graph break inside a block would split it into pieces run eagerly between graphs, which
reads as "compile does not help"; fullgraph turns it into an error instead
(tests/models/test_compile.py checks every SD3.5 block variant has none).

The modules around the blocks (patch and time / text embeddings, final norm and projection)
are compiled the same way: once per forward, but element-wise chains all the same.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["repeated_blocks", "nested_repeated_blocks", "glue_modules", "compile_repeated_blocks", "RECOMPILE_LIMIT"]

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


def nested_repeated_blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated layers of any model, at any depth (a text encoder's ``encoder.layers`` /
    ``encoder.block``, a transformer's blocks): every entry of a ModuleList of two or more
    modules of one class, outermost lists only (not the lists inside such an entry)."""
    out, inside = [], set()
    for m in module.modules():
        if id(m) in inside:
            continue
        if isinstance(m, torch.nn.ModuleList) and len(m) >= 2 and len({type(c) for c in m}) == 1:
            out.extend(m)
            inside.update(id(x) for c in m for x in c.modules())
    return out


def glue_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's direct children that are not lists of blocks (SD3: ``pos_embed``,
    ``time_text_embed``, ``context_embedder``, ``norm_out``, ``proj_out``)."""
    return [m for m in model.children() if not isinstance(m, torch.nn.ModuleList)]


def compile_repeated_blocks(model: torch.nn.Module, backend: str = "inductor", dynamic: Optional[bool] = False,
                            fullgraph: bool = True) -> int:
    """``block.compile(backend=..., dynamic=..., fullgraph=...)`` for every repeated block and
    every glue module around them; returns how many blocks (0 for a model without repeated
    blocks: nothing is compiled).

    Compilation itself happens lazily at the first forward of each (adapter, grad, shape)
    combination, i.e. during the first round. ``backend="eager"`` / ``"aot_eager"`` trace without
    generating kernels (what the CPU tests use); ``"inductor"`` is the one that fuses.
    """
    import torch._dynamo

    blocks = repeated_blocks(model)
    if not blocks:
        return 0
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for module in (*blocks, *glue_modules(model)):
        module.compile(backend=backend, dynamic=dynamic, fullgraph=fullgraph)
    return len(blocks)
