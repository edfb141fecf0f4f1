#!/usr/bin/env python
"""Evaluate a model (base, training checkpoint or any LoRA) on geneval / ocr / pickscore / drawbench.

    python scripts/evaluation.py --dataset ocr --checkpoint_path outputs/mopd/checkpoints/round-300 --use_ema
    python scripts/evaluation.py --dataset geneval --lora_path quanhaol/DiffusionOPD --lora_subfolder Student/lora
    torchrun --nproc_per_node 8 scripts/evaluation.py --dataset pickscore --resolution 1024
    bash scripts/single_node/eval.sh   (the same through a launcher; see its header)

Every flag: ``python scripts/evaluation.py --help``. Logic: diffusion_opd/evaluation/run.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusion_opd.evaluation.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())  # main() prints a user error as one line (diffusion_opd.errors.run_cli)
