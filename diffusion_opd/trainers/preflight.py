"""Everything a run checks before any weight loads; ``--validate_only`` runs exactly this.

In cost order: the config itself (a pure function, :func:`diffusion_opd.config.validate_config`),
devices, reward names, the prompt sets (read from disk), ``output_dir`` (a file, a read-only
folder, a used folder are refused), and the backbone's module names (its ``config.json`` only, built on the meta device)
against ``lora.target_modules``. Each failure is a one-line :class:`~diffusion_opd.errors.UserError`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..config import validate_config
from ..data.prompts import PromptDataset, run_prompts
from ..errors import ConfigError
from ..files import check_writable_folder
from .run_dir import check_output_dir
from .sharding import check_launch, check_strategy


@dataclass
class Preflight:
    """What the checks read and the run reuses."""

    prompts: dict[str, PromptDataset]  # training prompts per task
    eval_prompts: dict[str, PromptDataset]  # held-out prompts per task ({} when eval.every == 0)


def check_rewards(config) -> None:
    from ..rewards import reward_weights
    from ..rewards.video import check_video_rewards

    for name, spec in config.tasks.items():
        if spec.reward:
            try:
                reward_weights(spec.reward)  # one name or a weighted sum "ocr:1.0,pickscore:0.5"
                check_video_rewards(spec.reward, video=bool(config.sample.num_frames))
            except ValueError as err:
                raise ConfigError(f"tasks.{name}.reward: {err}") from None


def check_devices(config) -> None:
    """A CUDA device asked for where torch sees none is refused (accelerate would silently run on the CPU)."""
    import torch

    for key in ("device", "rl.reward_device", "eval.reward_device"):
        section, _, leaf = key.rpartition(".")
        value = str((config[section] if section else config)[leaf])
        if value.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"{key}: {value!r}, but torch sees no CUDA GPU here; use {key}=cpu (or auto)")


def check_backbone(config) -> None:
    """``lora.target_modules`` against the layers of the backbone ``model.path`` names."""
    from ..models.backbone import check_target_modules, module_names, transformer_config

    cfg = transformer_config(config.model.path, config.model.revision or None)
    if cfg is None:  # not a diffusers denoiser (the toy model): peft's own error covers it
        return
    check_target_modules(list(config.lora.target_modules), module_names(cfg, lora_layers_only=True),
                         where=f"{cfg.get('_class_name')} ({config.model.path})")


def preflight(config, world_size: int, backbone: bool = True, output_dir: bool = True) -> Preflight:
    """Run every check. ``backbone=False`` when the caller already holds a built policy;
    ``output_dir=False`` in a run, which checks the folder while claiming it (main process,
    under the lock, the outcome shared with every process)."""
    validate_config(config, world_size=world_size)
    check_launch(config, dict(os.environ))  # a copy: the run itself hides accelerate's FSDP switch later
    check_strategy(config, world_size)
    check_devices(config)
    check_rewards(config)
    prompts, eval_prompts = run_prompts(config, world_size)
    check_writable_folder("output_dir", config.output_dir)  # a file, below a file, read-only: before any print
    if output_dir:
        check_output_dir(config)
    if backbone:
        check_backbone(config)
    return Preflight(prompts, eval_prompts)
