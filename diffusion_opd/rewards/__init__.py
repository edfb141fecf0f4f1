"""Reward scorers: ``load_reward(name, **options)`` and ``MultiReward``.

One module per reward; the registry maps a name to ``module:Class`` so that importing this
package never imports a heavy reward stack (mmdet, paddle, open_clip...) you do not use.
Every scorer is called as ``scorer(images, prompts, metadata=None) -> {key: np.ndarray}``
(see base.py); ``load_reward(name, remote=URL)`` returns a client of a reward server started
with ``python -m diffusion_opd.rewards.serve --reward NAME --port P`` instead.
"""
from __future__ import annotations

import importlib
import inspect
import math
from typing import Any, Optional

from ..errors import UserError
from .base import MissingCheckpointError, Scorer, ckpt_root

REGISTRY: dict[str, str] = {
    "ocr": "diffusion_opd.rewards.ocr:OCRScorer",
    "geneval": "diffusion_opd.rewards.geneval:GenEvalScorer",
    "pickscore": "diffusion_opd.rewards.pickscore:PickScoreScorer",
    "clipscore": "diffusion_opd.rewards.clipscore:ClipScoreScorer",
    "hpsv2": "diffusion_opd.rewards.hpsv2:HPSv2Scorer",
    "aesthetic": "diffusion_opd.rewards.aesthetic:AestheticScorer",
    "imagereward": "diffusion_opd.rewards.imagereward:ImageRewardScorer",
    "unifiedreward": "diffusion_opd.rewards.unifiedreward:UnifiedRewardScorer",
    # weight-free, from the decoded pixels (CI, smoke runs, the toy demo)
    "brightness": "diffusion_opd.rewards.pixel:BrightnessScorer",
    "colorfulness": "diffusion_opd.rewards.pixel:ColorfulnessScorer",
    "target_color": "diffusion_opd.rewards.pixel:TargetColorScorer",
    # weight-free, videos only: frame-to-frame change (see rewards/video.py)
    "temporal_consistency": "diffusion_opd.rewards.video:TemporalConsistencyScorer",
    # The demo's toy world (weight-free, see rewards/toy.py).
    "toy_colour": "diffusion_opd.rewards.toy:ToyColourScorer",
    "toy_glyph": "diffusion_opd.rewards.toy:ToyGlyphScorer",
    "toy_aesthetic": "diffusion_opd.rewards.toy:ToyAestheticScorer",
}

_CACHE: dict[tuple, Scorer] = {}


def reward_names() -> list[str]:
    """Every registered reward name, sorted."""
    return sorted(REGISTRY)


def check_reward_name(name: str) -> None:
    """Raise ValueError listing the valid names when ``name`` is not a registered reward."""
    if name not in REGISTRY:
        raise ValueError(f"unknown reward '{name}'; valid rewards: {', '.join(reward_names())}")


def reward_weights(spec: str) -> dict[str, float]:
    """A task's reward spec -> ``{name: weight}``: ``"ocr"`` -> ``{"ocr": 1.0}``;
    ``"ocr:1.0,pickscore:0.5"`` -> a weighted sum (:class:`MultiReward`). Names are checked; a
    name given twice and a weight that is not a finite number are refused (a dict would keep
    only the last weight, and a NaN weight would turn every total into NaN)."""
    weights: dict[str, float] = {}
    for part in (p.strip() for p in str(spec).split(",")):
        if not part:
            continue
        name, _, weight = part.partition(":")
        name = name.strip()
        check_reward_name(name)
        if name in weights:
            raise ValueError(f"reward '{name}' appears twice in {spec!r}; give each reward once with its total weight")
        try:
            weights[name] = check_weight(name, float(weight) if weight else 1.0)
        except ValueError as err:
            raise ValueError(f"reward weight of '{name}' must be a finite number, got {weight!r}") from err
    if not weights:
        raise ValueError(f"no reward in {spec!r}; write 'name' or 'name:weight,name:weight'")
    return weights


def check_weight(name: str, weight: Any) -> float:
    """``weight`` as a float, or ValueError when it is not a finite number (bools refused)."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ValueError(f"weight of '{name}' must be a finite number, got {weight!r}")
    return float(weight)


def reward_class(name: str) -> type:
    """The scorer class of ``name`` (imports only that reward's module)."""
    check_reward_name(name)
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


class RewardOptionError(UserError, TypeError):
    """An option a reward does not have, or a value of the wrong kind (before anything loads)."""


def check_reward_options(name: str, options: dict[str, Any]) -> None:
    """Refuse, naming the option, an option ``name``'s scorer does not take, and a value whose
    kind differs from the option's default (a number, a bool) that would otherwise
    fail later, mid-run (``ocr.min_confidence='abc'`` failed when the first image was scored)."""
    params = inspect.signature(reward_class(name)).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = {k: p for k, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    for key, value in options.items():
        if key not in named:
            if takes_any:
                continue
            raise RewardOptionError(f"reward '{name}' has no option '{key}'; its options: {', '.join(named) or 'none'}")
        default = named[key].default
        if value is None or default is None or default is inspect.Parameter.empty:
            continue
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, (int, float)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:  # strings: paths, devices (a torch.device too) are checked by the scorer itself
            ok = True
        if not ok:
            raise RewardOptionError(f"reward '{name}': option '{key}' expects a {type(default).__name__} like its "
                                    f"default {default!r}, got {value!r}")


def load_reward(name: str, remote: Optional[str] = None, cache: bool = True, **options: Any) -> Scorer:
    """The scorer ``name`` (one instance per process and options; its model loads on first
    call), or a client of a reward server at ``remote``
    (``python -m diffusion_opd.rewards.serve --reward NAME --port P``)."""
    check_reward_name(name)
    if remote is not None:
        from .remote import RemoteScorer

        return RemoteScorer(name, remote, **options)
    check_reward_options(name, options)
    key = (name, tuple(sorted((k, repr(v)) for k, v in options.items())))
    if cache and key in _CACHE:
        return _CACHE[key]
    scorer = reward_class(name)(**options)
    if cache:
        _CACHE[key] = scorer
    return scorer


def __getattr__(attr: str):
    # MultiReward imports this package, so it is exposed lazily to avoid an import cycle.
    if attr == "MultiReward":
        from .multi import MultiReward

        return MultiReward
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


__all__ = [
    "REGISTRY", "MissingCheckpointError", "MultiReward", "RewardOptionError", "Scorer", "ckpt_root", "load_reward",
    "reward_class", "reward_names", "check_reward_name", "check_weight", "reward_weights",
]
