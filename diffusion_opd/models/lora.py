"""LoRA adapters on one backbone: read adapter folders, check they fit, inject, switch cheaply.

Two on-disk formats are read (both what the published checkpoints use):

* PEFT (``PeftModel.save_pretrained``): ``adapter_config.json`` + ``adapter_model.safetensors``
  with keys ``base_model.model.<module>.lora_A.weight``.
* diffusers (``save_lora_weights``): ``pytorch_lora_weights.safetensors`` with keys
  ``transformer.<module>.lora_A.weight``; the LoraConfig is in the safetensors metadata when
  diffusers >= 0.34 wrote it, otherwise ranks come from the shapes and alpha = rank (the
  convention every diffusers loader applies).

A two-expert model (Wan 2.2 A14B: a high-noise and a low-noise transformer) has one adapter per
expert: the first expert's in the folder itself, the second's in its subfolder ``transformer_2``
(same format; diffusers loads it with ``load_lora_weights(folder,
weight_name="transformer_2/pytorch_lora_weights.safetensors", load_into_transformer_2=True)``, a
local folder or a Hub repo; ``subfolder=`` is not an alternative: for a local folder diffusers
ignores it and loads the first expert's file). Read together they are ONE adapter on a module holding both
experts as ``transformer`` and ``transformer_2`` (models/wan.py): module names
``transformer.<module>`` / ``transformer_2.<module>``.
"""
from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager
from functools import partial
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..errors import UserError
from ..files import DamagedFileError, check_against_manifest
from .hub import ModelNotFoundError

__all__ = ["SECOND_EXPERT", "join_expert_adapters", "AdapterMismatchError", "LoraAdapter", "read_lora_adapter", "check_adapter_fits", "add_lora_adapter",
           "lora_conflicts", "add_student_adapter", "save_peft_adapter", "AdapterSwitch",
           "merge_adapter_into_layers", "merged_weights_as_parameters"]

PEFT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
DIFFUSERS_FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
_PREFIXES = ("base_model.model.", "transformer.")  # PEFT, diffusers
_METADATA_KEY = "lora_adapter_metadata"  # where diffusers stores the LoraConfig
SECOND_EXPERT = "transformer_2"  # a two-expert pipeline's second denoiser; its adapter's subfolder
FIRST_EXPERT = "transformer"


class AdapterMismatchError(UserError, ValueError):
    """An adapter whose modules or shapes do not match the backbone."""


@dataclass
class LoraAdapter:
    """A LoRA adapter in memory: peft-named weights relative to the transformer + its config."""

    state_dict: dict[str, torch.Tensor]  # "<module>.lora_A.weight" / "<module>.lora_B.weight"
    config: "object"  # peft.LoraConfig
    source: str  # the file it came from (for messages)

    @property
    def modules(self) -> list[str]:
        """Names of the adapted modules."""
        return sorted({k.rsplit(".lora_", 1)[0] for k in self.state_dict})


def _load_weights(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    return torch.load(path, map_location="cpu", weights_only=True), {}


def _find_weights(folder: str, weight_name: Optional[str]) -> str:
    names = (weight_name,) if weight_name else PEFT_FILES + DIFFUSERS_FILES
    for name in names:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    found = sorted(os.listdir(folder)) if os.path.isdir(folder) else "folder missing"
    raise ModelNotFoundError(
        f"no LoRA weights in {folder}: looked for {', '.join(names)}; found {found}. Expected a PEFT "
        f"adapter (adapter_config.json + adapter_model.safetensors) or a diffusers LoRA "
        f"(pytorch_lora_weights.safetensors)."
    )


def read_lora_adapter(folder: str, weight_name: Optional[str] = None) -> LoraAdapter:
    """Read a PEFT- or diffusers-format LoRA for the transformer from ``folder``; a two-expert
    adapter (LoRA weights in ``folder/transformer_2`` too) as one adapter on both experts.

    Text-encoder LoRA keys (diffusers format) are ignored: only the transformer is adapted.
    """
    second = os.path.join(folder, SECOND_EXPERT)
    if any(os.path.isfile(os.path.join(second, n)) for n in ((weight_name,) if weight_name else PEFT_FILES + DIFFUSERS_FILES)):
        return join_expert_adapters({FIRST_EXPERT: _read_one_adapter(folder, weight_name),
                                     SECOND_EXPERT: _read_one_adapter(second, weight_name)})
    return _read_one_adapter(folder, weight_name)


def join_expert_adapters(parts: dict[str, LoraAdapter]) -> LoraAdapter:
    """One adapter from one per expert (``{"transformer": a, "transformer_2": b}``): module names
    prefixed with the expert, each module's own rank and alpha kept (rank / alpha patterns on the
    full names wherever they differ from the most common)."""
    from peft import LoraConfig
    from peft.utils.other import get_pattern_key

    rslora = {bool(a.config.use_rslora) for a in parts.values()}
    if len(rslora) > 1:
        raise AdapterMismatchError(f"{' and '.join(a.source for a in parts.values())}: one expert's LoRA uses rsLoRA "
                                   "scaling and the other's does not; give both experts the same kind of adapter")
    state, ranks, alphas = {}, {}, {}
    for expert, adapter in parts.items():
        state.update({f"{expert}.{k}": v for k, v in adapter.state_dict.items()})
        pattern = adapter.config.alpha_pattern or {}
        for module in adapter.modules:
            ranks[f"{expert}.{module}"] = adapter.state_dict[f"{module}.lora_B.weight"].shape[1]
            key = get_pattern_key(list(pattern), module) if pattern else module
            alphas[f"{expert}.{module}"] = pattern.get(key, adapter.config.lora_alpha)

    def common(values):
        values = list(values)
        return max(set(values), key=values.count)

    r, alpha = common(ranks.values()), common(alphas.values())
    config = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora.pop(),
                        rank_pattern={m: v for m, v in ranks.items() if v != r},
                        alpha_pattern={m: v for m, v in alphas.items() if v != alpha})
    config.target_modules = sorted(ranks)
    return LoraAdapter(state, config, " + ".join(a.source for a in parts.values()))


def _read_one_adapter(folder: str, weight_name: Optional[str]) -> LoraAdapter:
    from peft import LoraConfig

    path = _find_weights(folder, weight_name)
    check_against_manifest(path)  # a training checkpoint's file: named if it is not what was written
    try:
        raw, metadata = _load_weights(path)
    except Exception as err:  # SafetensorError, a truncated torch file...: whatever it is, this file is the cause
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DamagedFileError(f"{path}: cannot be read as LoRA weights ({type(err).__name__}: {message}); "
                               "the file is damaged or incomplete: copy it again") from None
    state = {}
    for key, value in raw.items():
        if key.startswith(("text_encoder.", "text_encoder_2.")):
            continue
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        state[key] = value
    if not state:
        raise AdapterMismatchError(f"{path} holds no transformer LoRA weights (keys: {list(raw)[:4]} ...)")
    if not all(".lora_A." in k or ".lora_B." in k for k in state):
        from diffusers.utils import convert_unet_state_dict_to_peft  # old "lora.down/up" naming

        state = convert_unet_state_dict_to_peft(state)
    bad = [k for k in state if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if bad:
        raise AdapterMismatchError(f"{path}: unsupported LoRA keys (only plain LoRA A/B weights): {bad[:3]}")

    ranks = {k.rsplit(".lora_B", 1)[0]: v.shape[1] for k, v in state.items() if ".lora_B." in k}
    config_file = os.path.join(os.path.dirname(path), "adapter_config.json")
    if os.path.isfile(config_file):
        check_against_manifest(config_file)
        try:
            with open(config_file) as f:
                kwargs = json.load(f)
        except ValueError as err:
            raise DamagedFileError(f"{config_file}: not valid JSON ({err}); the file is damaged") from None
    elif _METADATA_KEY in metadata:
        meta = json.loads(metadata[_METADATA_KEY])
        kwargs = {k.removeprefix("transformer."): v for k, v in meta.items() if not k.startswith("text_encoder")}
    else:
        rank = max(set(ranks.values()), key=list(ranks.values()).count)
        kwargs = dict(r=rank, lora_alpha=rank, rank_pattern={m: r for m, r in ranks.items() if r != rank})
        kwargs["alpha_pattern"] = dict(kwargs["rank_pattern"])
    if kwargs.get("use_dora") or kwargs.get("lora_bias"):
        raise AdapterMismatchError(f"{path}: DoRA / LoRA-bias adapters are not supported")
    keep = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora")
    config = LoraConfig(**{k: kwargs[k] for k in keep if kwargs.get(k) is not None})
    # Adapt exactly the modules present in the weights (exact names), not the saved patterns.
    config.target_modules = sorted(ranks)
    return LoraAdapter(state, config, path)


def check_adapter_fits(adapter: LoraAdapter, model: torch.nn.Module, label: str) -> None:
    """Raise :class:`AdapterMismatchError` naming ``label`` (e.g. "teacher 'ocr'") and the first
    module that does not fit."""
    for module_name in adapter.modules:
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise AdapterMismatchError(
                f"{label} ({adapter.source}) does not fit the backbone: module '{module_name}' "
                f"does not exist in {type(model).__name__}"
            ) from None
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        a = adapter.state_dict.get(f"{module_name}.lora_A.weight")
        b = adapter.state_dict.get(f"{module_name}.lora_B.weight")
        problem = None
        if not isinstance(base, torch.nn.Linear):
            problem = f"is a {type(base).__name__}, not a Linear layer"
        elif a is None or b is None:
            problem = "has only one of lora_A / lora_B"
        elif a.shape[1] != base.in_features or b.shape[0] != base.out_features or a.shape[0] != b.shape[1]:
            problem = (f"is Linear({base.in_features} -> {base.out_features}) but the adapter has "
                       f"lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}")
        if problem:
            raise AdapterMismatchError(
                f"{label} ({adapter.source}) does not fit the backbone: module '{module_name}' {problem}"
            )


def add_lora_adapter(model: torch.nn.Module, adapter: LoraAdapter, name: str, label: Optional[str] = None) -> None:
    """Inject ``adapter`` into ``model`` under ``name`` and load its weights (checked first)."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    label = label or f"adapter '{name}'"
    check_adapter_fits(adapter, model, label)
    if name in getattr(model, "peft_config", {}):
        raise ValueError(f"an adapter named '{name}' is already loaded")
    with warnings.catch_warnings():  # peft warns that several adapters share the model: intended
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        inject_adapter_in_model(adapter.config, model, adapter_name=name)
    result = set_peft_model_state_dict(model, adapter.state_dict, adapter_name=name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if ".lora_" in k]
    if unexpected:
        raise AdapterMismatchError(f"{label} ({adapter.source}): weights not loaded: {unexpected[:3]}")


def lora_conflicts(adapter: LoraAdapter, lora: dict, defaults: dict) -> list[str]:
    """``lora.*`` settings that were changed from ``defaults`` and disagree with ``adapter`` (a
    student started from ``adapter`` takes its rank, alpha and targets; a default is just superseded)."""
    def norm(key, value):
        return tuple(value) if key == "target_modules" else value

    changed = {k: norm(k, lora[k]) for k in ("rank", "alpha", "target_modules")
               if k in lora and norm(k, lora[k]) != norm(k, defaults[k])}
    out = []
    if "rank" in changed and changed["rank"] != adapter.config.r:
        out.append(f"lora.rank={changed['rank']} but the adapter has rank {adapter.config.r}")
    if "alpha" in changed and changed["alpha"] != adapter.config.lora_alpha:
        out.append(f"lora.alpha={changed['alpha']} but the adapter has alpha {adapter.config.lora_alpha}")
    if "target_modules" in changed:
        def matches(module, target):
            return module == target or module.endswith("." + target)

        targets, modules = changed["target_modules"], adapter.modules
        if not all(any(matches(m, t) for m in modules) for t in targets) or \
                not all(any(matches(m, t) for t in targets) for m in modules):
            adapted = sorted({m.split(".", 2)[-1] for m in modules})
            out.append(f"lora.target_modules={list(targets)} but the adapter adapts {adapted}")
    return out


def add_student_adapter(model: torch.nn.Module, lora: dict, name: str, init: Optional[LoraAdapter] = None) -> None:
    """Add the trainable student adapter ``name``: a fresh LoRA from ``lora`` (rank, alpha, init,
    target_modules), or, with ``init``, exactly that adapter (its rank, alpha, targets and weights;
    ``model.student_init``)."""
    if init is not None:
        add_lora_adapter(model, init, name, label="model.student_init")
        return
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], init_lora_weights=lora["init"],
                                 target_modules=list(lora["target_modules"])), adapter_name=name)


def save_peft_adapter(directory: str, state: dict[str, torch.Tensor], config, base_model: str = "") -> None:
    """Write ``state`` (peft names, as ``get_peft_model_state_dict`` returns) as a PEFT adapter folder.

    ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
    ``base_model.model.<module>.lora_A.weight``: what ``PeftModel.save_pretrained`` writes, so
    ``PeftModel.from_pretrained(transformer, directory)`` (the peers' loader) reads it.
    """
    import copy

    from safetensors.torch import save_file

    config = copy.deepcopy(config)
    config.target_modules = sorted(config.target_modules)  # a set in memory; a stable file
    config.base_model_name_or_path = base_model or None
    config.inference_mode = True
    os.makedirs(directory, exist_ok=True)
    config.save_pretrained(directory)
    save_file({f"base_model.model.{k}": v.detach().cpu().contiguous() for k, v in state.items()},
              os.path.join(directory, PEFT_FILES[0]), metadata={"format": "pt"})


Span = tuple  # (adapter name or None for the base model, first row, row after the last)


class _SpanForward:
    """Mixed into every peft LoRA layer class by :class:`AdapterSwitch` (the layer's class becomes
    a subclass of its own): while ``_opd_spans`` is set, rows ``start:stop`` of the batch go through
    adapter ``name`` (a LoRA adapter, or a teacher merged into its own copy of this layer's weight),
    as contiguous slices: no per-row gather / scatter, no per-row Python loop (peft's own mixed
    batches build index lists per layer). Otherwise peft's forward runs unchanged."""

    def forward(self, x, *args, **kwargs):
        spans = self._opd_spans
        if spans is None:
            return super().forward(x, *args, **kwargs)
        return _span_forward(self, x, spans, *args, **kwargs)


def _lora_delta(layer, name: str, x: torch.Tensor) -> torch.Tensor:
    """``s B A x`` of adapter ``name`` (peft's vanilla LoRA branch, its input cast included)."""
    lora_a = layer.lora_A[name]
    x = layer._cast_input_dtype(x, lora_a.weight.dtype)
    return layer.lora_B[name](lora_a(layer.lora_dropout[name](x))) * layer.scaling[name]


def _span_forward(layer, x: torch.Tensor, spans, *args, **kwargs) -> torch.Tensor:
    merged = layer._opd_merged
    base = layer.base_layer
    if not any(name in merged for name, _, _ in spans):
        # one base matmul for every row, each LoRA span added into its own rows in place
        result = base(x, *args, **kwargs)
        for name, start, stop in spans:
            if name is not None and name in layer.lora_A:
                result[start:stop].add_(_lora_delta(layer, name, x[start:stop]).to(result.dtype))
        return result
    # merged teachers: each span's rows through its own weight (W + s B A, precomputed)
    pieces = []
    for name, start, stop in spans:
        weight = getattr(layer, merged[name]) if name in merged else base.weight
        if weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            weight = weight.to(x.dtype)  # e.g. FSDP's bf16 compute over an fp32 backbone (buffers keep theirs)
        part = torch.nn.functional.linear(x[start:stop], weight, base.bias)
        if name is not None and name not in merged and name in layer.lora_A:
            part = part + _lora_delta(layer, name, x[start:stop]).to(part.dtype)
        pieces.append(part)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


_SPAN_CLASSES: dict[type, type] = {}


def _with_spans(layer) -> None:
    """Give ``layer`` the span-aware forward (once; a subclass of its own class, so peft's
    isinstance checks and every other method are unchanged)."""
    cls = type(layer)
    if issubclass(cls, _SpanForward):
        return
    if cls not in _SPAN_CLASSES:
        _SPAN_CLASSES[cls] = type(cls.__name__, (_SpanForward, cls), {"__module__": cls.__module__})
    layer.__class__ = _SPAN_CLASSES[cls]
    layer.__dict__.setdefault("_opd_merged", {})
    layer._opd_spans = None


def merge_adapter_into_layers(model: torch.nn.Module, adapter: LoraAdapter, name: str) -> int:
    """Teacher fast path: inject ``adapter``, store ``W + s B A`` of every layer it adapts as a
    non-persistent buffer of that layer (in the backbone's dtype, peft's own delta), then remove
    the adapter. Only the adapted layers get a second weight, not the whole backbone; spans of
    rows select it (:meth:`AdapterSwitch.spans`). Returns the bytes the merged weights take."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    add_lora_adapter(model, adapter, name, label=f"teacher '{name}'")
    total = 0
    with torch.no_grad():
        for index, layer in enumerate(m for m in model.modules() if isinstance(m, BaseTunerLayer)):
            if name not in layer.lora_A:
                continue
            base = layer.get_base_layer()
            weight = (base.weight + layer.get_delta_weight(name).to(base.weight.dtype)).detach()
            buffer = f"_opd_merged_{index}_{len(layer.__dict__.get('_opd_merged', {}))}"
            layer.register_buffer(buffer, weight, persistent=False)
            layer.__dict__.setdefault("_opd_merged", {})[name] = buffer
            with warnings.catch_warnings():  # peft: "was active, now deleted" (the student is the active one)
                warnings.filterwarnings("ignore", message=".*now deleted.*")
                layer.delete_adapter(name)
            total += weight.numel() * weight.element_size()
    model.peft_config.pop(name, None)
    return total


def merged_weights_as_parameters(model: torch.nn.Module) -> int:
    """Re-register every merged teacher weight (:func:`merge_adapter_into_layers`'s buffers) as a
    frozen parameter of its layer, under the same name, so that FSDP2's ``fully_shard`` (which
    shards parameters, never buffers) cuts it like the backbone weight beside it and all-gathers
    it with its block. The layer's forward reads it by name either way. They stay out of
    ``state_dict()`` like the non-persistent buffers they were (a state dict hook drops them):
    the student's state dict, checkpoints and exports never carry them. Returns the count."""
    count = 0
    for layer in model.modules():
        names = [b for b in layer.__dict__.get("_opd_merged", {}).values() if b in layer._buffers]
        for buffer in names:
            weight = layer._buffers.pop(buffer)
            layer._non_persistent_buffers_set.discard(buffer)
            layer.register_parameter(buffer, torch.nn.Parameter(weight, requires_grad=False))
        if names:
            layer._register_state_dict_hook(partial(_drop_keys, names=tuple(names)))
        count += len(names)
    return count


def _drop_keys(module, state_dict, prefix, local_metadata, names=()):
    for name in names:
        state_dict.pop(prefix + name, None)


def add_adapter_copy(model: torch.nn.Module, source: str, name: str) -> dict[str, torch.nn.Parameter]:
    """Inject adapter ``name`` with the structure (LoraConfig) of adapter ``source`` and a copy of
    its current weights, frozen. Returns ``{source parameter name: copy}``."""
    import copy

    from peft import inject_adapter_in_model

    if name in getattr(model, "peft_config", {}):
        raise ValueError(f"an adapter named '{name}' is already loaded")
    with warnings.catch_warnings():  # peft warns that several adapters share the model: intended
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        inject_adapter_in_model(copy.deepcopy(model.peft_config[source]), model, adapter_name=name)
    named = dict(model.named_parameters())
    copies = {}
    with torch.no_grad():
        for key, param in named.items():
            if f".{source}." in key:
                target = named[key.replace(f".{source}.", f".{name}.")]
                target.data = param.detach().clone()  # same dtype as the source (the fp32 student)
                target.requires_grad_(False)
                copies[key] = target
    return copies


class AdapterSwitch:
    """Cheap switching between adapters already injected in one model.

    ``restore()`` runs peft's ``set_adapter`` once: the default adapter active and trainable, every
    other adapter frozen. After that, ``activate(name)`` / ``back()`` only flip which adapter the
    LoRA layers apply (``_active_adapter`` / ``_disable_adapters``, the two attributes peft's
    forward reads) and never touch ``requires_grad``: peft's own ``set_adapter`` walks every
    parameter of every layer on each call (measured: ~27 ms per teacher query at SD3.5-M size vs
    ~1.5 ms for the flip), and re-freezing is unnecessary because teachers are frozen from the
    start and the student's parameters do not enter a graph while it is inactive. Layers that
    lack the requested adapter run as the base layer, which is exactly "base + that adapter".
    """

    def __init__(self, model: torch.nn.Module, default: str):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.default = default
        self.layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        for layer in self.layers:  # see spans()
            _with_spans(layer)
        self._input_casting = True  # peft's default

    def input_casting(self, enabled: bool) -> None:
        """Whether the LoRA layers cast their input to the adapter's weight dtype (peft's default).

        Under autocast the cast is pure overhead: peft would upcast every bf16/fp16 activation
        to the fp32 student's dtype and autocast would cast it straight back for the matmul
        (two full-activation copies per LoRA layer forward, two more in backward: 191 layers in
        SD3.5-M). Both roundings are exact, so disabling it under autocast gives bit-identical
        results. Without autocast it is needed (a bf16 input cannot meet an fp32 weight).
        Flips only when the setting changes (a no-op on every later call).
        """
        if enabled != self._input_casting:
            for layer in self.layers:
                layer.cast_input_dtype_enabled = enabled
            self._input_casting = enabled

    def activate(self, name: Optional[str]) -> None:
        """Make ``name`` the active adapter (``None``: every adapter off, the base model)."""
        for layer in self.layers:
            if name is not None:
                layer._active_adapter = [name]
            layer._disable_adapters = name is None

    @contextmanager
    def spans(self, spans: Sequence[Span]):
        """Inside: rows ``start:stop`` of every batch go through adapter ``name`` (``None``: the
        base model; a merged teacher: its merged weights), for ``(name, start, stop)`` in
        ``spans``, which cover the batch. Inference only (the frozen teachers).

        The spans travel as a layer attribute read by the layers' own forward (set up once at
        construction, never hooks added per call): torch.compile guards on attributes a forward
        reads, so one graph is kept per span layout and reused.
        """
        spans = tuple((name, int(start), int(stop)) for name, start, stop in spans)
        for layer in self.layers:
            layer._opd_spans = spans
        try:
            yield
        finally:
            for layer in self.layers:
                layer._opd_spans = None

    def back(self) -> None:
        """The default adapter active again (its parameters were never frozen)."""
        self.activate(self.default)

    def restore(self) -> None:
        """The default adapter active and trainable, every other adapter frozen (full peft path)."""
        for layer in self.layers:
            layer.set_adapter(self.default)
            layer.enable_adapters(True)
