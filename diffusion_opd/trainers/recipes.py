"""Which recipe trains a config (``config.recipe``), and cascades of stages.

``train(config)`` runs OPD, DiffusionNFT or Flow-GRPO / GRPO-Guard. ``train_cascade`` runs
single-task stages in sequence, each stage's student starting from the previous stage's final
student (``model.student_init``; its EMA weights when the stage kept an EMA, the weights the
references evaluate and save): the paper's cascade NFT baseline. A stage whose final
checkpoint exists is skipped, a stage that was interrupted resumes from its latest checkpoint
(or starts again when killed before its first one), so rerunning a killed cascade continues it.
"""
from __future__ import annotations

import os
from typing import Sequence

__all__ = ["train", "cascade_stages", "train_cascade"]


def train(config):
    """Run (or resume) ``config`` with its recipe (the registry's, diffusion_opd/recipes.py);
    returns the finished :class:`Run`."""
    from ..recipes import recipe_spec
    from .run import Run

    spec = recipe_spec(config.recipe)
    run = Run(config)
    return run.train(spec.build(run))


def cascade_stages(spec: str) -> tuple[str, tuple[str, ...]]:
    """``config/nft.py:cascade`` -> (the config file, its stage names from ``CASCADES``)."""
    from ..config import ConfigError, _import_file, config_file

    path, _, name = spec.partition(":")
    path = config_file(path)
    if not os.path.isfile(path):
        raise ConfigError(f"--cascade: file {path!r} not found")
    cascades = getattr(_import_file(path, "_diffusion_opd_cascades"), "CASCADES", {})
    if name not in cascades:
        raise ConfigError(f"--cascade: no cascade {name!r} in {path}; valid: {', '.join(cascades) or 'none'}")
    return path, tuple(cascades[name])


def train_cascade(spec: str, output_dir: str, overrides: Sequence[str] = ()) -> list[str]:
    """Train the stages of cascade ``spec`` in order under ``output_dir/stage<i>-<name>``;
    ``overrides`` apply to every stage. Returns each stage's final checkpoint folder (the next
    stage starts from its ``ema/`` subfolder when there is one).

    Rerunning continues: a finished stage is skipped, a stage with a checkpoint resumes from its
    latest one, and a stage killed before its first checkpoint starts again (its partial files
    moved aside, as ``overwrite=true`` does). ``overwrite=true`` starts every stage again."""
    from ..config import load_config, validate_config
    from .checkpoint import evaluated_folder, list_checkpoints, round_dir
    from .run_dir import describe_previous_run

    path, stages = cascade_stages(spec)
    configs = []
    for i, name in enumerate(stages):  # every stage is validated before the first one trains
        config = load_config(f"{path}:{name}", list(overrides))
        config.output_dir = os.path.join(output_dir, f"stage{i + 1}-{name}")
        restart = bool(config.overwrite)  # the user's: start the cascade over
        if not restart and list_checkpoints(config.output_dir):
            config.resume_from = "latest"
        else:
            config.resume_from = ""
            config.overwrite = restart or bool(describe_previous_run(config.output_dir))
        validate_config(config, world_size=int(os.environ.get("WORLD_SIZE", "1")))
        configs.append((config, restart))
    finals: list[str] = []
    for config, restart in configs:
        if finals:  # this stage starts as the last stage's student (its EMA weights when it kept one)
            config.model.student_init = evaluated_folder(finals[-1])
        final = round_dir(config.output_dir, config.train.num_rounds)
        if restart or final not in [p for _, p in list_checkpoints(config.output_dir)]:
            if config.overwrite and not restart:
                print(f"[cascade] {config.output_dir} was interrupted before its first checkpoint: "
                      "training it again from its start")
            train(config)
        finals.append(final)
    return finals
