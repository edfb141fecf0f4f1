#!/usr/bin/env python
"""Export a training checkpoint: ``dopd-export`` / ``python -m diffusion_opd.export`` (the logic and
every flag: diffusion_opd/export.py, ``--help``)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusion_opd.export import build_parser, export, main  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
