"""Train with any recipe: OPD (stage 2), DiffusionNFT or Flow-GRPO / GRPO-Guard (stage 1).

    dopd-train --config config/nft.py:tiny [key.sub=value ...]     (= python -m diffusion_opd.train,
    python scripts/train.py --config config/nft.py:tiny             = python scripts/train.py)
    python scripts/train.py --config config/grpo.py:ocr
    python scripts/train.py --cascade config/nft.py:tiny_cascade output_dir=outputs/tiny_cascade
    accelerate launch --config_file scripts/accelerate_configs/multi_gpu.yaml --num_processes 8 \\
        scripts/train.py --config config/nft.py:geneval

The recipe is the config's ``recipe`` key (``--config`` defaults to ``config/opd.py:mopd``). A
teacher trained here is a checkpoint folder (``<output_dir>/checkpoints/round-N``): point an OPD
config's ``teachers.<name>.path`` at it. Overrides may be written ``key=value``, ``--key=value``
or ``--config.key=value`` / ``--config.key value``; unknown keys are rejected. A cascade takes
``output_dir=`` (default ``outputs/<cascade name>``) and applies the other overrides to every stage.
``--validate_only`` runs every check a real run makes before loading weights, prints the per-GPU
memory of a round of a counted real model under ddp and fsdp (diffusion_opd/budget.py) and refuses
in one line a GPU it cannot fit (``distributed.gpu_memory_gb``, else CUDA's), then exits.
"""
import argparse
import os
import sys

from .config import load_config
from .errors import run_cli


def main(argv=None) -> int:
    """Exit code: 0, or 2 (1 for weights that cannot be fetched) with the error as one line."""
    return run_cli(_main, list(sys.argv[1:] if argv is None else argv))


def _main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--config", default="opd:mopd",
                       help="path/to/file.py:NAME, or a shipped config NAME:CONFIG (opd, nft, grpo, demo; e.g. opd:tiny_mopd)")
    group.add_argument("--cascade", help="path/to/file.py:NAME of a cascade (the file's CASCADES)")
    parser.add_argument("--validate_only", action="store_true",
                        help="run every check a real run makes before loading weights, print the config, exit")
    args, overrides = parser.parse_known_args(argv)
    if args.cascade:
        from .trainers.recipes import train_cascade

        out = [o.split("=", 1)[1] for o in overrides if o.lstrip("-").startswith("output_dir=")]
        rest = [o for o in overrides if not o.lstrip("-").startswith("output_dir=")]
        root = out[-1] if out else os.path.join("outputs", args.cascade.partition(":")[2])
        for path in train_cascade(args.cascade, root, rest):
            print(f"[cascade] stage done: {path}")
        return 0
    config = load_config(args.config, overrides)
    if args.validate_only:
        from .budget import budget_line, gpu_memory_bytes
        from .recipes import recipe_spec
        from .trainers.preflight import preflight
        from .trainers.sharding import ACCELERATE_CONFIGS

        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        preflight(config, world_size)
        budget = budget_line(config, world_size, gpu_memory_bytes(config))  # a GPU too small: one-line ConfigError
        print(config)
        print(recipe_spec(config.recipe).derived_geometry(config, world_size))
        print(f"accelerate_config: {ACCELERATE_CONFIGS[config.distributed.strategy]}")  # read by launch.sh
        if budget:
            print(budget)
        return 0
    from .trainers.recipes import train

    train(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
