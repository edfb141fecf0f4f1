#!/usr/bin/env python
"""The first seconds of scripts/gpu_bench.sh: is this machine ready to benchmark?

    python scripts/gpu_bench_check.py --device cuda --output OUTDIR/versions.json

Exit 0: ready (versions written to --output). Exit 3: a package is missing, or peft / diffusers
is not the version the code was tested with (the carried wheels were not installed or not on
PYTHONPATH: docs/benchmarks.md, "the one GPU command"). Exit 4: the device is not usable (no
CUDA device visible, or a small matmul on it fails). Nothing is built; seconds, not minutes, so
a failed check leaves time for a rerun on a lent machine.
"""
import argparse
import importlib
import importlib.util
import json
import os
import platform
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what models/lora.py (peft internals) and the tiny pipeline folder were tested with; None: any
PINNED = {"torch": None, "transformers": None, "accelerate": None, "safetensors": None, "ml_collections": None,
          "diffusers": "0.42.1", "peft": "0.21.2"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    found, problems = {"python": platform.python_version()}, []
    for name, want in PINNED.items():
        try:
            module = importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 -- any import failure means: not ready
            problems.append(f"{name}: cannot be imported ({type(err).__name__}: {err})")
            continue
        found[name] = getattr(module, "__version__", "?")
        if want and found[name] != want:
            problems.append(f"{name} {found[name]} but the code was tested with {want}")
    spec = importlib.util.find_spec("open_clip")  # only its BPE vocabulary file is read (tiny tokenizer)
    if spec is None or not os.path.isfile(os.path.join(list(spec.submodule_search_locations)[0],
                                                       "bpe_simple_vocab_16e6.txt.gz")):
        problems.append("open_clip (open-clip-torch): its BPE vocabulary file is missing")
    sys.path.insert(0, ROOT)
    try:
        import diffusion_opd.models  # noqa: F401 -- the project itself, from this checkout
    except Exception as err:  # noqa: BLE001
        problems.append(f"diffusion_opd: cannot be imported from {ROOT} ({type(err).__name__}: {err})")
    if problems:
        print("[check] not ready: " + "; ".join(problems), flush=True)
        return 3
    import torch

    if args.device == "cuda":
        try:
            if not torch.cuda.is_available():
                raise RuntimeError("torch.cuda.is_available() is False")
            a = torch.ones(256, 256, device="cuda", dtype=torch.bfloat16)
            float((a @ a).sum())
            found["device_name"] = torch.cuda.get_device_name(0)
            found["device_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
            found["cuda"] = torch.version.cuda
        except Exception as err:  # noqa: BLE001
            print(f"[check] the CUDA device is not usable: {type(err).__name__}: {err}", flush=True)
            return 4
    found["device"] = args.device
    with open(args.output, "w") as f:
        json.dump(found, f, indent=1)
    print("[check] ready: " + ", ".join(f"{k} {v}" for k, v in found.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
