"""Experiment trackers through accelerate's tracker API (``logging.trackers``): wandb,
tensorboard, mlflow, comet_ml, aim, ... whatever accelerate supports and is installed.

``<output_dir>/metrics.jsonl`` stays the source of truth (trainers/metrics.py writes it first);
trackers get a copy of every numeric value and the pictures, on the main process only. Local
trackers (tensorboard) write under ``<output_dir>/logs/<logging.wandb_project>/``, wandb under
``<output_dir>/wandb/``. A resumed run continues the same wandb run (its id is in the checkpoint).
"""
from __future__ import annotations

import os
from typing import Optional

WANDB_MODES = ("online", "offline")


def tracker_names(config) -> list[str]:
    """``logging.trackers`` (comma-separated), plus wandb when ``logging.wandb_mode`` is online /
    offline (the older spelling of asking for it)."""
    raw = config.logging.trackers
    names = [n.strip() for n in (raw.split(",") if isinstance(raw, str) else raw) if n.strip()]
    if config.logging.wandb_mode in WANDB_MODES and "wandb" not in names:
        names.append("wandb")
    return list(dict.fromkeys(names))


def logging_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "logs")


def _flat(config: dict, prefix: str = "") -> dict:
    """Dotted keys, scalar values: what every tracker's hyper-parameter table takes."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) or value is None else str(value)
    return out


class Trackers:
    """The accelerator's trackers of one run (none when ``logging.trackers`` names none)."""

    def __init__(self, accelerator, config, config_dict: dict, wandb_id: Optional[str] = None):
        self.accelerator = accelerator
        self.wandb_id = wandb_id
        self.active = bool(tracker_names(config))
        if not self.active:
            return
        log = config.logging
        wandb = {"name": config.run_name, "dir": config.output_dir, "id": wandb_id, "resume": "allow"}
        if log.wandb_mode in WANDB_MODES:
            wandb["mode"] = log.wandb_mode
        if "wandb" in tracker_names(config):
            os.makedirs(config.output_dir, exist_ok=True)
        accelerator.init_trackers(log.wandb_project, config=_flat(config_dict), init_kwargs={"wandb": wandb})
        if accelerator.is_main_process and "wandb" in tracker_names(config):
            self.wandb_id = accelerator.get_tracker("wandb", unwrap=True).id

    def log(self, row: dict) -> None:
        if self.active:
            self.accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "round"},
                                 step=row["round"])

    def log_images(self, images: dict[str, str], step: int) -> None:
        """PNG files (``{key: path}``) as images at ``step``, to the trackers that take images."""
        if not (self.active and images and self.accelerator.is_main_process):
            return
        import numpy as np
        from PIL import Image

        arrays = {key: np.asarray(Image.open(path).convert("RGB")) for key, path in images.items()}
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({k: a[None] for k, a in arrays.items()}, step=step, dataformats="NHWC")
            elif hasattr(tracker, "log_images"):
                tracker.log_images({k: [a] for k, a in arrays.items()}, step=step)

    def finish(self) -> None:
        if self.active:
            self.accelerator.end_training()
