#!/usr/bin/env python
"""Train a student by multi-task on-policy distillation.

    python scripts/train_opd.py --config config/opd.py:tiny_mopd [key.sub=value ...]
    accelerate launch --config_file scripts/accelerate_configs/multi_gpu.yaml --num_processes 8 \\
        scripts/train_opd.py --config config/opd.py:mopd
    torchrun --nproc_per_node 2 scripts/train_opd.py --config config/opd.py:tiny_mopd

Overrides may be written ``key=value``, ``--key=value`` or, as absl / ml_collections users type
them, ``--config.key=value`` / ``--config.key value``; unknown keys are rejected.
``--validate_only`` runs every check a real run makes before loading weights, then exits.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusion_opd.config import load_config  # noqa: E402
from diffusion_opd.errors import run_cli  # noqa: E402


def main(argv=None) -> int:
    """Exit code: 0, or 2 (1 for weights that cannot be fetched) with the error as one line."""
    return run_cli(_main, list(sys.argv[1:] if argv is None else argv))


def _main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config/opd.py:mopd", help="path/to/file.py:NAME")
    parser.add_argument("--validate_only", action="store_true",
                        help="run every check a real run makes before loading weights, print the config, exit")
    args, overrides = parser.parse_known_args(argv)
    config = load_config(args.config, overrides)
    if args.validate_only:
        from diffusion_opd.config import derived_geometry
        from diffusion_opd.trainers.preflight import preflight

        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        preflight(config, world_size)
        print(config)
        print(derived_geometry(config, world_size))
        return 0
    from diffusion_opd.trainers.opd import train

    train(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
