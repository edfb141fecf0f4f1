#!/usr/bin/env python
"""`make demo`: the main job on the built-in CPU default.

Distils two random teacher adapters into the LoRA student of a tiny random SD3 (built offline
in seconds) with the real multi-task OPD trainer, then prints how far the student moved toward
each teacher on held-out prompts. About a minute on two CPU cores.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusion_opd.config import load_config  # noqa: E402
from diffusion_opd.errors import run_cli  # noqa: E402
from diffusion_opd.trainers.metrics import read_metrics  # noqa: E402
from diffusion_opd.trainers.opd import train  # noqa: E402


def main():
    config = load_config("config/opd.py:tiny_mopd", ["output_dir=outputs/demo"] + sys.argv[1:])
    if os.path.isdir(config.output_dir) and not config.resume_from:
        import shutil

        shutil.rmtree(config.output_dir)
    train(config)
    rows = [r for r in read_metrics(config.output_dir) if any(k.startswith("eval/distance/") for k in r)]
    first, last = rows[0], rows[-1]
    print("\nheld-out student-teacher distance (per-step L2, lower is better):")
    for key in sorted(k for k in first if k.startswith("eval/distance/")):
        drop = 1 - last[key] / first[key]
        print(f"  {key.split('/')[-1]:>10}: round {first['round']}: {first[key]:.4g} -> round {last['round']}: "
              f"{last[key]:.4g}  ({drop:.0%} lower)")
    print(f"\nmetrics: {config.output_dir}/metrics.jsonl; checkpoints: {config.output_dir}/checkpoints/")
    print(json.dumps({"final_round": last["round"]}))


if __name__ == "__main__":
    sys.exit(run_cli(main))
