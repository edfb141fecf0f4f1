#!/usr/bin/env python
"""Train with any recipe: ``dopd-train`` / ``python -m diffusion_opd.train`` (the logic and every
flag: diffusion_opd/train.py, ``--help``). In a clone, ``--validate_only`` of an fsdp run also
prints the per-GPU memory of a round (scripts/round_budget.py) and refuses a GPU too small.

    python scripts/train.py --config config/nft.py:tiny [key.sub=value ...]
    accelerate launch --config_file scripts/accelerate_configs/multi_gpu.yaml --num_processes 8 \\
        scripts/train.py --config config/nft.py:geneval
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusion_opd.errors import run_cli  # noqa: E402
from diffusion_opd.train import main as train_main  # noqa: E402


def main(argv=None) -> int:
    """``diffusion_opd.train``; with ``--validate_only`` under ``distributed.strategy=fsdp`` it
    then prints the per-GPU memory of a round (this tooling lives in scripts/, not the package)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    code = train_main(argv)
    if code == 0 and "--validate_only" in argv and "--cascade" not in argv:
        code = run_cli(fsdp_memory, argv)
    return code


def fsdp_memory(argv) -> int:
    """Under distributed.strategy=fsdp, print the per-GPU memory of a round of a counted model
    (scripts/round_budget.py: SD3.5-M/L, FLUX.1-dev); a one-line ConfigError when it exceeds
    this machine's GPU. Nothing loads."""
    import argparse

    import torch
    from round_budget import fsdp_budget_line

    from diffusion_opd.config import load_config

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", default="opd:mopd")
    parser.add_argument("--validate_only", action="store_true")
    args, overrides = parser.parse_known_args(argv)
    config = load_config(args.config, overrides)
    if config.distributed.strategy == "fsdp":
        gpu = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
        line = fsdp_budget_line(config, int(os.environ.get("WORLD_SIZE", "1")), gpu)
        if line:
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
