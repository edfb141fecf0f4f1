#!/usr/bin/env python
"""Train with any recipe: ``dopd-train`` / ``python -m diffusion_opd.train`` (the logic and every
flag, ``--validate_only`` and its per-GPU memory budget included: diffusion_opd/train.py, ``--help``).

    python scripts/train.py --config config/nft.py:tiny [key.sub=value ...]
    accelerate launch --config_file scripts/accelerate_configs/multi_gpu.yaml --num_processes 8 \\
        scripts/train.py --config config/nft.py:geneval
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusion_opd.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
