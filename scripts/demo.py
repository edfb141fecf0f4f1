#!/usr/bin/env python
"""`make demo`: ``dopd-demo`` / ``python -m diffusion_opd.demo`` (the logic and every flag:
diffusion_opd/demo/__main__.py, ``--help``).

    python scripts/demo.py [--quick] [--seed 0] [--output_dir outputs/demo]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusion_opd.demo.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
