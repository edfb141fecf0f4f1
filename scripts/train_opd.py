#!/usr/bin/env python
"""Train a student by multi-task on-policy distillation.

    python scripts/train_opd.py --config config/opd.py:tiny_mopd [key.sub=value ...]
    accelerate launch --config_file scripts/accelerate_configs/multi_gpu.yaml --num_processes 8 \\
        scripts/train_opd.py --config config/opd.py:mopd
    torchrun --nproc_per_node 2 scripts/train_opd.py --config config/opd.py:tiny_mopd

Overrides may be written ``key=value``, ``--key=value`` or, as absl / ml_collections users type
them, ``--config.key=value`` / ``--config.key value``; unknown keys are rejected.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusion_opd.config import ConfigError, load_config  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config/opd.py:mopd", help="path/to/file.py:NAME")
    parser.add_argument("--validate_only", action="store_true", help="check the config and print it; load nothing")
    args, overrides = parser.parse_known_args(argv)
    try:
        config = load_config(args.config, overrides)
        if args.validate_only:
            from diffusion_opd.config import derived_geometry, validate_config

            validate_config(config, world_size=int(os.environ.get("WORLD_SIZE", "1")))
            print(config)
            print(derived_geometry(config, int(os.environ.get("WORLD_SIZE", "1"))))
            return 0
        from diffusion_opd.trainers.opd import train

        train(config)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
