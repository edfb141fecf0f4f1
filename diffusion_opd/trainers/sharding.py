"""Sharded training with PyTorch FSDP2 (``distributed.strategy = "fsdp"``).

Under ``ddp`` (the default) every process holds the whole frozen backbone and the trainer
averages the student's LoRA gradients itself, once per round (trainers/setup.py). Under ``fsdp``
every denoiser (the transformer with ALL its adapters: the student LoRA, the teacher LoRAs, the
NFT old-policy copy; full-transformer teachers too) is cut with
``torch.distributed.fsdp.fully_shard``: each repeated transformer block is one shard group, the
root module (embeddings, norms, projection) another. Each process then keeps ``1/N`` of every
parameter; a block's full weights exist only while that block runs (all-gathered before its
forward / backward, freed after: ``distributed.reshard_after_forward``).

Nothing else changes: peft's adapter switching and mixed-adapter batches only flip attributes of
the LoRA layers and route rows, so they work on sharded blocks as they do on whole ones; the
teachers' weights are all-gathered with the block they live in. Merged teachers
(``perf.merge_teachers``) keep their merged layer weights (``W + sBA``) as buffers under ddp;
under fsdp they become frozen parameters first (``merged_weights_as_parameters``), so each
process holds 1/N of them too. The price: a block's all-gather carries its merged copies at
every forward and backward, the student's included (per teacher, +the adapted layers' bytes,
~0.9 GB over the whole SD3.5-M transformer), where the LoRA teachers add only their small A/B.

Text encoders (``distributed.text_encoders``): ``replicate`` (the default) keeps them whole on
every process; ``shard`` (fsdp only) cuts each encoder layer by layer with fully_shard (frozen,
forward only, in the model's dtype: the all-gathered weights are the replicated ones, so the
embeddings are bit-identical); ``rank0`` loads them on rank 0 only, which encodes the prompts
of every process (gathered as strings, the rows scattered back: one object gather and one
scatter per encode call). Both are collectives: every process encodes in lockstep (under
``shard`` the processes pad their cache misses with the empty prompt to the same count of
encoder forwards). ``rank0`` also works under ddp (any world size; one process: replicate).

Gradients: FSDP2 reduce-scatters a block's gradients after its backward. A round runs many
backwards (the fused rollout backpropagates at every trained step) and must reduce ONCE:
:class:`ReduceOnce` turns gradient sync off (``set_requires_gradient_sync(False)``: gradients
accumulate unsharded, which costs one full copy of the LoRA gradients per process, a few MB)
and on again just before the last backward before the optimizer step (a denoiser of two experts,
Wan 2.2 A14B, reduces at every backward: see :class:`ReduceOnce`). The reduction averages
in fp32 (``MixedPrecisionPolicy(reduce_dtype=float32)``) like the DDP path.

Mixed precision: ``mixed_precision="bf16"`` becomes ``MixedPrecisionPolicy(param_dtype=bf16)``
(every all-gathered weight, LoRA included, computes in bf16; the fp32 student stays fp32 in its
shard, gradients are reduced in fp32), not autocast over sharded weights. fp16 is refused (it
would need a sharded loss scaler).

Checkpoints hold GATHERED tensors, the same files as under ``ddp`` (diffusers LoRA, PEFT
folder, ``student_raw``, EMA, and ``optimizer.pt`` with full-size Adam moments): a checkpoint
resumes under either strategy and any world size (Adam's state is per element); under the same
world size and strategy the resumed run is bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import os
from functools import partial
from typing import Any, Callable, Optional

import torch

from ..config import CHOICES
from ..errors import ConfigError

STRATEGIES = ("ddp", "fsdp")
TEXT_ENCODERS = CHOICES["distributed.text_encoders"]  # replicate | shard | rank0
ACCELERATE_CONFIGS = {"ddp": "scripts/accelerate_configs/multi_gpu.yaml",
                      "fsdp": "scripts/accelerate_configs/fsdp2.yaml"}

__all__ = ["STRATEGIES", "TEXT_ENCODERS", "ACCELERATE_CONFIGS", "is_fsdp", "check_strategy", "launched_strategy",
           "shard_policy", "place_text_encoders", "everyone_samples",
           "ReduceOnce", "gather", "shard_like", "clip_grad_norm_", "local_bytes"]


def is_fsdp(config) -> bool:
    return config.distributed.strategy == "fsdp"


def everyone_samples(config) -> bool:
    """Whether sampling is a collective (every process takes part in a rollout another process
    asked for, e.g. the main process's sample grids): the denoiser is sharded, or encoding a
    prompt needs every process (``distributed.text_encoders`` other than replicate)."""
    return is_fsdp(config) or config.distributed.text_encoders != "replicate"


def check_strategy(config, world_size: int) -> None:
    """The combinations ``fsdp`` and ``distributed.text_encoders`` refuse, each a one-line
    ConfigError (before anything loads)."""
    text = config.distributed.text_encoders
    if text == "shard" and not is_fsdp(config):
        raise ConfigError("distributed.text_encoders: shard needs distributed.strategy=fsdp (the encoders are cut "
                          "with FSDP2); under ddp use distributed.text_encoders=rank0 to hold them on rank 0 only")
    if text == "shard" and config.model.offload_text_encoders:
        raise ConfigError("model.offload_text_encoders: true with distributed.text_encoders=shard is not supported "
                          "(sharded encoders stay on the device, 1/N each); set it to false or use text_encoders=rank0")
    if not is_fsdp(config):
        return
    if world_size < 2:
        raise ConfigError(f"distributed.strategy: fsdp shards over processes but {world_size} started; launch >= 2 "
                          "processes (NUM_GPUS=N bash scripts/single_node/...) or use distributed.strategy=ddp")
    if config.mixed_precision == "fp16":
        raise ConfigError("mixed_precision: fp16 with distributed.strategy=fsdp is not supported (it needs a sharded "
                          "loss scaler); use mixed_precision=bf16")
    if config.perf.compile == "on":
        raise ConfigError("perf.compile: on with distributed.strategy=fsdp is not supported yet (compiled blocks "
                          "inside fully_shard are untested here); use perf.compile=off")


def launched_strategy(environ=os.environ) -> Optional[str]:
    """What the accelerate config this process was launched with says: ``"fsdp"`` (its
    distributed_type is FSDP), ``"ddp"`` (accelerate launch without FSDP), ``"deepspeed"``, or
    None (torchrun / python: nothing to compare)."""
    if environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "deepspeed"
    if environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    return "ddp" if "ACCELERATE_MIXED_PRECISION" in environ else None


def check_launch(config, environ=os.environ) -> None:
    """Refuse an accelerate config that disagrees with ``distributed.strategy`` (one line), then
    hide accelerate's FSDP switch from this process: the trainer applies FSDP2 itself, and
    accelerate's own FSDP plugin would wrap and prepare modules a second time."""
    launched, strategy = launched_strategy(environ), config.distributed.strategy
    if launched == "deepspeed":
        raise ConfigError("accelerate config: DeepSpeed is not supported; launch with "
                          f"{ACCELERATE_CONFIGS[strategy]} (distributed.strategy={strategy})")
    if launched is not None and launched != strategy:
        raise ConfigError(f"distributed.strategy: {strategy} but the accelerate config launched {launched}; launch "
                          f"with {ACCELERATE_CONFIGS[strategy]} or set distributed.strategy={launched}")
    if launched == "fsdp" and environ.get("FSDP_VERSION", "2") != "2":
        raise ConfigError(f"accelerate config: fsdp_version {environ.get('FSDP_VERSION')}; the trainer shards with "
                          f"FSDP2: launch with {ACCELERATE_CONFIGS['fsdp']}")
    environ.pop("ACCELERATE_USE_FSDP", None)


def compute_dtype(config) -> torch.dtype:
    from ..dtypes import parse_dtype

    return torch.bfloat16 if config.mixed_precision == "bf16" else parse_dtype(config.model.dtype)


def shard_denoiser(module: torch.nn.Module, config, mesh=None) -> int:
    """``fully_shard`` every repeated block, then the root; returns the number of shard groups."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from ..models.compile import repeated_blocks

    dtype = compute_dtype(config)
    mp = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype, reduce_dtype=torch.float32)
    kwargs = dict(mesh=mesh, mp_policy=mp, reshard_after_forward=config.distributed.reshard_after_forward)
    blocks = repeated_blocks(module)
    if not blocks:
        raise ConfigError(f"distributed.strategy: fsdp needs a model with repeated transformer blocks; "
                          f"{type(module).__name__} has none (use distributed.strategy=ddp)")
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(module, **kwargs)
    return len(blocks) + 1


def shard_policy(policy, config) -> Callable[[torch.nn.Parameter], torch.nn.Parameter]:
    """Shard every denoiser of ``policy`` in place; returns ``remap(old parameter) -> sharded
    parameter`` for the parameter lists callers hold (fully_shard registers new parameters)."""
    from torch.distributed.device_mesh import init_device_mesh

    from ..models.lora import merged_weights_as_parameters

    modules = policy.denoiser_modules()
    for module in modules:  # merged teachers: frozen parameters, so they are sharded with the backbone
        merged_weights_as_parameters(module)
    before = {id(p): (i, name) for i, m in enumerate(modules) for name, p in m.named_parameters()}
    device = torch.device(policy.device)
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for module in modules:
        shard_denoiser(module, config, mesh)
    after = [dict(m.named_parameters()) for m in modules]
    policy.rebind_student()

    def remap(param: torch.nn.Parameter) -> torch.nn.Parameter:
        i, name = before[id(param)]
        return after[i][name]

    return remap


def shard_text_encoders(policy, config, mesh) -> list[torch.nn.Module]:
    """``distributed.text_encoders=shard``: load the policy's text encoders on the CPU and cut each
    one layer by layer, then its root (fully_shard moves each shard to the mesh's device as it
    goes, so no process ever holds a whole encoder on the device). Frozen, forward only, no
    mixed precision: the all-gathered weights are exactly the loaded ones."""
    from torch.distributed.fsdp import fully_shard

    from ..models.compile import nested_repeated_blocks

    encoders = policy.text_encoder_modules(load=True)
    for encoder in encoders:
        encoder.requires_grad_(False).eval()
        for layer in nested_repeated_blocks(encoder):  # CLIP encoder.layers, T5 encoder.block, an LM's layers
            fully_shard(layer, mesh=mesh, reshard_after_forward=True)
        fully_shard(encoder, mesh=mesh, reshard_after_forward=True)
    return encoders


def place_text_encoders(policy, config, device: torch.device) -> None:
    """Apply ``distributed.text_encoders`` to ``policy`` (replicate: nothing to do)."""
    mode = config.distributed.text_encoders
    if mode == "replicate":
        return
    import torch.distributed as dist

    if not hasattr(policy, "set_text_encoding"):
        return  # no text-encoder weights (the demo's toy embeds prompts by a fixed rule): nothing to place

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return  # one process: every placement is the replicated one
    if mode == "rank0":
        policy.set_text_encoding(encode_on_rank0)
        return
    from torch.distributed.device_mesh import init_device_mesh

    shard_text_encoders(policy, config, init_device_mesh(device.type, (dist.get_world_size(),)))
    policy.set_text_encoding(partial(encode_in_lockstep, device=device), placed=True)


def encode_on_rank0(texts: list[str], encode_here: Callable[[list[str]], list]) -> list:
    """Every process's ``texts`` gathered on rank 0, encoded there (each distinct text once), and
    each process's rows sent back to it. Only rank 0 ever calls ``encode_here``."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    everyone: list = [None] * world
    dist.all_gather_object(everyone, texts)  # (gather_object is not on every backend; these are short strings)
    out = None
    if rank == 0:
        distinct = list(dict.fromkeys(t for mine in everyone for t in mine))
        rows = dict(zip(distinct, encode_here(distinct))) if distinct else {}
        out = [[rows[t] for t in mine] for mine in everyone]
    mine = [None]
    dist.scatter_object_list(mine, out, src=0)
    return mine[0]


def encode_in_lockstep(texts: list[str], encode_here: Callable[[list[str]], list], device: torch.device) -> list:
    """Sharded encoders: every process runs the same number of encoder forwards (the most texts
    any process misses; the others pad with the empty prompt and drop those rows)."""
    import torch.distributed as dist

    count = torch.tensor([len(texts)], device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    most = int(count.item())
    if most == 0:
        return []
    return encode_here(texts + [""] * (most - len(texts)))[:len(texts)]


class ReduceOnce:
    """Gradient sync of the sharded student only on the last backward before an optimizer step.

    ``expect(n)`` announces how many backwards come before the next step; ``backward(loss)``
    runs one, with FSDP2's reduce-scatter switched on only for the ``n``-th. ``check()`` (at
    the step) refuses a step whose gradients were never reduced: a recipe that announced the
    wrong count would otherwise step on unreduced gradients without a word.

    FSDP2 reduces a shard group's held gradients only in a backward that reaches the group. A
    denoiser of several experts (Wan 2.2 A14B: the high-noise expert runs only at the first steps,
    so never in the round's last backward) therefore reduces at every backward: a LoRA gradient
    reduce-scatter per backward, small next to the all-gathers of the weights."""

    def __init__(self, modules: list[torch.nn.Module], backward: Callable[[torch.Tensor], None]):
        self.modules, self._backward = modules, backward
        self.pending: Optional[int] = None
        self.every_backward = any(len(getattr(m, "experts", ())) > 1 for m in modules)
        self._set(self.every_backward)

    def _set(self, sync: bool) -> None:
        for m in self.modules:
            m.set_requires_gradient_sync(sync)

    def expect(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"ReduceOnce.expect: at least one backward, got {n}")
        self.pending = n

    def backward(self, loss: torch.Tensor) -> None:
        if not self.pending:
            raise RuntimeError("ReduceOnce: a backward was not announced with expect(n) (sharded gradients would "
                               "never be reduced)")
        self.pending -= 1
        last = self.pending == 0 and not self.every_backward
        if last:
            self._set(True)
        try:
            self._backward(loss)
        finally:
            if last:
                self._set(False)
            if self.pending == 0:
                self.pending = None

    def check(self) -> None:
        if self.pending is not None:
            raise RuntimeError(f"ReduceOnce: optimizer step with {self.pending} announced backward(s) not run: the "
                               "gradients were not reduced over processes")


def _is_dtensor(x: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


def gather(obj: Any) -> Any:
    """``obj`` with every DTensor replaced by its full tensor (a collective: every process must
    call it on the same structure); plain tensors and other values are returned as they are."""
    if _is_dtensor(obj):
        return obj.full_tensor()
    if isinstance(obj, dict):
        return type(obj)((k, gather(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(gather(v) for v in obj)
    return obj


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` cut like ``like``: this process's shard as a DTensor when ``like`` is one (no
    communication: every process holds ``full``), else ``full`` unchanged."""
    if not _is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    if tuple(full.shape) != tuple(like.shape):
        raise ValueError(f"shape {tuple(full.shape)} != {tuple(like.shape)}")
    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)


@torch.no_grad()
def copy_full_(target: torch.Tensor, full: torch.Tensor) -> None:
    """``target.copy_(full)`` where ``target`` may be sharded (its shard of ``full``)."""
    if _is_dtensor(target):
        target.to_local().copy_(shard_like(full, target).to_local())
    else:
        target.copy_(full)


def shard_optimizer_state(state: dict, params: list[torch.Tensor]) -> dict:
    """A gathered ``optimizer.state_dict()`` (full-size moments, as saved) cut like ``params``
    (the optimizer's parameters in order) so it loads into an optimizer over sharded parameters."""
    out = {**state, "state": {}}
    for idx, entry in state["state"].items():
        p = params[int(idx)]
        out["state"][idx] = {k: shard_like(v, p) if torch.is_tensor(v) and v.shape == p.shape and v.ndim else v
                             for k, v in entry.items()}
    return out


def clip_grad_norm_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ on sharded gradients: the total norm over all shards (one
    all-reduce of a scalar) and the same clip coefficient on every process."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    norm = norm.full_tensor() if _is_dtensor(norm) else norm
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def local_bytes(module: torch.nn.Module) -> tuple[int, int]:
    """(bytes this process holds, bytes of the whole module) over the module's parameters."""
    local = full = 0
    for p in module.parameters():
        t = p.to_local() if _is_dtensor(p) else p
        local += t.numel() * t.element_size()
        full += p.numel() * p.element_size()
    return local, full
