"""``python -m diffusion_opd.evaluation`` = ``dopd-eval`` (diffusion_opd/evaluation/run.py)."""
import sys

from .run import main

if __name__ == "__main__":
    sys.exit(main())
