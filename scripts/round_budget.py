#!/usr/bin/env python
"""Per-GPU memory of one OPD round for every counted architecture at its recipe's geometry,
under ddp and fsdp over N GPUs, as the markdown table of README / docs/benchmarks.md. The
counting is the package's (diffusion_opd/budget.py, the architecture on the meta device: no
weights, no GPU, about a minute of CPU for all rows); this is its command line.

    python scripts/round_budget.py                       # every architecture, fsdp over 2 4 8
    python scripts/round_budget.py --models qwen-image --world 2 4 8 16 --text_encoders shard
    python scripts/round_budget.py --json                # every figure, machine-readable
    python scripts/round_budget.py --allgather --world 8 --models sd3.5-medium flux.2-dev qwen-image
"""
import argparse
import json
import os
import sys
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusion_opd.budget import (RECIPES, TEXT_ENCODER_PLACEMENTS, allgather_volume, recipe_geometry,  # noqa: E402
                                  round_memory)
from diffusion_opd.errors import run_cli  # noqa: E402


def geometry_text(geo) -> str:
    sample = f"{geo.frames} x {geo.resolution} px video" if geo.frames else f"{geo.resolution} px image"
    return f"{geo.images} {sample}{'s' * (geo.images > 1)}{' x CFG' if geo.student_cfg else ''}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4, 8], help="fsdp world sizes (columns)")
    parser.add_argument("--text_encoders", default="replicate", choices=TEXT_ENCODER_PLACEMENTS,
                        help="text encoder placement of the columns (the last column always shards them)")
    parser.add_argument("--json", action="store_true", help="print every part of every cell as JSON instead")
    parser.add_argument("--allgather", action="store_true",
                        help="print fsdp's all-gather volume per GPU per round over the largest --world instead")
    parser.add_argument("--bandwidth", type=float, default=360.0, help="--allgather: bus bandwidth assumed, GB/s")
    args = parser.parse_args(argv)
    if args.allgather:
        return print_allgather(args.models, max(args.world), args.bandwidth * 1e9)
    top, place = max(args.world), args.text_encoders
    rows = []
    for model in args.models:
        geo = recipe_geometry(model)
        cells = [round_memory(model, geo, "ddp", 1, place)] + [round_memory(model, geo, "fsdp", n, place)
                                                                 for n in args.world]
        cells.append(round_memory(model, geo, "fsdp", top, "shard"))
        rows.append((model, geo, cells))
    if args.json:
        print(json.dumps([{"model": m, "recipe": RECIPES[m], "cells": cells} for m, _, cells in rows], indent=1))
        return 0
    print(f"| model (recipe) | per GPU per forward | ddp (any N) | " + " | ".join(f"fsdp x{n}" for n in args.world)
          + f" | of which text encoders ({place}) | fsdp x{top}, text encoders sharded |")
    print("|---|---|---|" + "---|" * len(args.world) + "---|---|")
    for model, geo, cells in rows:
        gbs = " | ".join(f"{c['total_gb']} GB" for c in cells[:-1])
        print(f"| {model} (`{RECIPES[model]}`) | {geometry_text(geo)} | {gbs} | "
              f"{cells[0]['bytes']['text_encoders'] / 1e9:.1f} GB | {cells[-1]['total_gb']} GB |")
    return 0


def print_allgather(models, world: int, bandwidth: float) -> int:
    print(f"| model (recipe) | transformer + 4 LoRAs, 2 bytes each | gathers per round (lockstep) | per GPU per round "
          f"over {world} GPUs (lockstep) | time at {bandwidth / 1e9:.0f} GB/s (lockstep) |")
    print("|---|---|---|---|---|")
    for model in models:
        geo = recipe_geometry(model)
        a, b = allgather_volume(model, geo, world, bandwidth), allgather_volume(model, replace(geo, lockstep=True),
                                                                                world, bandwidth)
        print(f"| {model} (`{RECIPES[model]}`) | {a['bytes_per_gather'] / 1e9:.2f} GB | {a['gathers_per_round']} "
              f"({b['gathers_per_round']}) | {a['received_per_gpu'] / 1e12:.2f} TB ({b['received_per_gpu'] / 1e12:.2f} TB) "
              f"| {a['seconds_at_bandwidth']:.1f} s ({b['seconds_at_bandwidth']:.1f} s) |")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
