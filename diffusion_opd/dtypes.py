"""The one dtype parser: every weight / compute dtype a config key, a flag or a reward option
names goes through here.

The canonical names are the config's ``fp32`` / ``fp16`` / ``bf16``; the torch spellings
(``float32``, ``float16``, ``half``, ``bfloat16``, ``float``) that reward options have always
accepted are aliases of them. Torch is imported only when a torch dtype is asked for, so a
check (:func:`dtype_name`) costs nothing.
"""
from __future__ import annotations

__all__ = ["DTYPE_NAMES", "dtype_name", "parse_dtype"]

DTYPE_NAMES = ("fp32", "fp16", "bf16")
_TORCH_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}


def dtype_name(dtype) -> str:
    """``"fp16"`` / ``"float16"`` / ``torch.float16`` ... -> ``"fp16"``; ValueError naming the
    valid names otherwise."""
    if not isinstance(dtype, str):  # a torch dtype
        for name, torch_name in _TORCH_NAMES.items():
            if str(dtype) == f"torch.{torch_name}":
                return name
    elif dtype in _TORCH_NAMES:
        return dtype
    elif dtype in _ALIASES:
        return _ALIASES[dtype]
    raise ValueError(f"unknown dtype {dtype!r}; valid: {list(DTYPE_NAMES)}")


def parse_dtype(dtype):
    """Any name :func:`dtype_name` accepts (or a torch dtype among those) -> the torch dtype."""
    import torch

    return getattr(torch, _TORCH_NAMES[dtype_name(dtype)])
