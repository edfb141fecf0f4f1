#!/usr/bin/env python
"""Train a student by multi-task on-policy distillation (the same entry as scripts/train.py,
which also runs the stage-1 recipes and cascades; ``--config`` defaults to ``config/opd.py:mopd``).

    python scripts/train_opd.py --config config/opd.py:tiny_mopd [key.sub=value ...]
    accelerate launch --config_file scripts/accelerate_configs/multi_gpu.yaml --num_processes 8 \\
        scripts/train_opd.py --config config/opd.py:mopd
    torchrun --nproc_per_node 2 scripts/train_opd.py --config config/opd.py:tiny_mopd

Overrides may be written ``key=value``, ``--key=value`` or, as absl / ml_collections users type
them, ``--config.key=value`` / ``--config.key value``; unknown keys are rejected.
``--validate_only`` runs every check a real run makes before loading weights, then exits.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
