"""A backbone's architecture from its config alone: module names without loading a weight.

The denoiser's ``config.json`` (``<pipeline>/transformer/config.json``; a few kB from the Hub)
names its diffusers class; building that class on the meta device allocates nothing, so the
names of every module of SD3.5 (or any other family diffusers knows) are listed in a second.
The trainer checks ``lora.target_modules`` against them before the weights load.
"""
from __future__ import annotations

import difflib
import json
import os
import tempfile
from typing import Optional, Sequence

import torch

from ..errors import ConfigError

BUILTIN = "builtin:"
__all__ = ["transformer_config", "module_names", "check_target_modules"]

# Layer types peft can put a LoRA on (a target matching only other modules fails inside peft).
_LORA_LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Embedding)


def transformer_config(model_path: str, revision: Optional[str] = None,
                       subfolder: str = "transformer") -> Optional[dict]:
    """The denoiser's config dict (with ``_class_name``) of a local pipeline folder, a Hub id,
    or a builtin tiny model (``builtin:tiny-sd3``); reads nothing but that one JSON file.
    None for a model that is not a diffusers pipeline with a denoiser config (the toy family)."""
    if model_path.startswith(BUILTIN):
        return _builtin_config(model_path[len(BUILTIN):], subfolder)
    if os.path.isdir(model_path):
        path = os.path.join(model_path, subfolder, "config.json")
        if not os.path.isfile(path) and os.path.isfile(os.path.join(model_path, "model_index.json")):
            return None  # a pipeline of another kind (the toy model): its family checks its own adapters
        if not os.path.isfile(path):
            raise ConfigError(f"model.path: {model_path} has no {subfolder}/config.json; give a diffusers pipeline "
                              "folder (written by save_pretrained or `hf download <id> --local-dir DIR`)")
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HFValidationError

        from .hub import _hub_error, _invalid_id

        try:
            path = hf_hub_download(model_path, f"{subfolder}/config.json", revision=revision)
        except HFValidationError as err:
            raise _invalid_id(model_path, "model", err) from None
        except OSError as err:
            raise _hub_error(model_path, revision, "model", err) from None
    with open(path) as f:
        return json.load(f)


def _builtin_config(name: str, subfolder: str) -> Optional[dict]:
    from .tiny import TINY_BUILDERS, TINY_TRANSFORMER_CONFIGS

    if name in TINY_TRANSFORMER_CONFIGS:
        return dict(TINY_TRANSFORMER_CONFIGS[name])
    if name not in TINY_BUILDERS:
        raise ConfigError(f"model.path: unknown builtin {BUILTIN + name!r}; valid: "
                          f"{', '.join(BUILTIN + n for n in TINY_BUILDERS)}")
    with tempfile.TemporaryDirectory() as tmp:  # a second or so: build it to read its config
        return transformer_config(TINY_BUILDERS[name](os.path.join(tmp, name), seed=0), subfolder=subfolder)


def module_names(config: dict, lora_layers_only: bool = False) -> list[str]:
    """Dotted names of every module of the diffusers model ``config`` describes (built on the
    meta device: no memory, no weights). ``lora_layers_only``: only layers peft can adapt."""
    import diffusers

    class_name = config.get("_class_name")
    cls = getattr(diffusers, class_name, None) if class_name else None
    if cls is None:
        raise ConfigError(f"model.path: the denoiser config names class {class_name!r}, which diffusers "
                          f"{diffusers.__version__} does not have")
    with torch.device("meta"):  # buffers computed at init too (SD3's sin-cos table: seconds on the CPU)
        model = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    return [n for n, m in model.named_modules() if n and (not lora_layers_only or isinstance(m, _LORA_LAYERS))]


def _matches(target: str, name: str) -> bool:
    """peft's rule for a list of target names: the module name or its dotted suffix."""
    return name == target or name.endswith("." + target)


def check_target_modules(targets: Sequence[str], layer_names: Sequence[str], *, key: str = "lora.target_modules",
                         where: str = "the backbone") -> None:
    """Every target must name at least one LoRA-able layer, else ConfigError with the closest names."""
    for target in targets:
        if any(_matches(target, n) for n in layer_names):
            continue
        parts = [n.split(".") for n in layer_names]
        suffixes = sorted({".".join(p[-k:]) for p in parts for k in (1, 2, 3)
                           if k <= len(p) and not p[-k].isdigit()})  # "attn.to_q", not "1.attn.to_q"
        close = difflib.get_close_matches(target, suffixes, n=3)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise ConfigError(f"{key}: '{target}' matches no Linear/Conv/Embedding layer of {where}{hint}")
