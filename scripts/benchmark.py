#!/usr/bin/env python
"""Benchmark one OPD round (the trainer's own code path) on random weights of the real model.

    python scripts/benchmark.py --model tiny --device cpu --output outputs/bench_cpu_tiny.json
    python scripts/benchmark.py --model sd3.5-medium --device cuda --output outputs/bench_h100.json

A round is the released mopd geometry on one process: 3 tasks x 3 images, 10 ODE steps (9
trained), student CFG 4.5, teacher CFG 1.0 / 4.5 / 4.5; 512 px for sd3.5-medium, 64 px for the
tiny model. Each variant (one table row) runs in a fresh process: one FLOP-counting round, the
warm-up rounds, then the timed rounds. Writes JSON (see docs/benchmarks.md) and prints a table.
Needs no network: the models are built from random weights under --workdir (reused next time).
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scripts/benchmarking.py: tooling, not library

from benchmarking import (DEFAULT_DTYPE, EXPECTED_ONLY, MODELS, VARIANTS, default_variants, prepare_models,  # noqa: E402
                          expected_round_flops, resolve_variants, run_variant)
from text_encoder_offload import text_encoder_offload  # noqa: E402
from diffusion_opd.errors import run_cli  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=[*MODELS, *EXPECTED_ONLY], default="tiny")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--output", help="JSON file to write (required unless --expected-flops)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing (compilation happens here)")
    p.add_argument("--variants", default="", help=f"comma-separated subset of: {', '.join(VARIANTS)} "
                   "(default: all but the dtype row equal to the baseline)")
    p.add_argument("--workdir", default=os.path.join("outputs", "benchmark"),
                   help="where the random models are written once and reused")
    p.add_argument("--cpu-threads", type=int, default=0,
                   help="torch threads on the CPU (0: torch's default); 1 on a shared or tiny machine")
    p.add_argument("--flops", type=int, default=int(os.environ.get("BENCH_FLOPS") or 0),
                   help="the round's FLOPs when known (env BENCH_FLOPS): skips the FLOP-counting round "
                        "(SD3.5-M mopd: 1257919736315904, lockstep identical; see docs/benchmarks.md)")
    p.add_argument("--profile", action="store_true",
                   help="one more round under torch.profiler per variant, summarised in its row (GPU busy, top kernels)")
    p.add_argument("--prepare-only", action="store_true",
                   help="only build the random model folders under --workdir (what scripts/gpu_bench.sh does first)")
    p.add_argument("--expected-flops", action="store_true",
                   help="only print the round's FLOPs predicted from the architecture (meta device, no GPU)")
    p.add_argument("--expected-memory", action="store_true",
                   help="only print the per-GPU memory of a round at the model's recipe geometry under ddp and fsdp "
                        "over 2 / 4 / 8 GPUs, counted from the architecture (diffusion_opd/budget.py)")
    p.add_argument("--in-process", action="store_true",
                   help="run the variants in this process (faster start; peak RSS then accumulates)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one variant, write --worker-output
    p.add_argument("--worker-output", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.expected_memory and args.model == "tiny":
        p.error("--expected-memory: use a real model, e.g. --model sd3.5-medium (the tiny model needs no budget)")
    if args.expected_flops or args.expected_memory:
        return args
    if args.model in EXPECTED_ONLY:
        p.error(f"--model {args.model}: only --expected-flops / --expected-memory (its round is predicted on the "
                "meta device, not timed)")
    if args.prepare_only:
        return args
    if not args.output:
        p.error("--output FILE.json is required")
    if args.rounds < 1 or args.warmup < 0 or args.cpu_threads < 0 or args.flops < 0:
        p.error("--rounds must be >= 1, --warmup, --cpu-threads and --flops >= 0")
    try:
        args.variants = resolve_variants([v.strip() for v in args.variants.split(",") if v.strip()]
                                         or default_variants(args.device))
    except ValueError as err:
        p.error(str(err))
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device is visible to torch here")
    if args.model == "sd3.5-medium" and args.device == "cpu":
        p.error("sd3.5-medium on the CPU: a round is about 4 PFLOP (hours here); use --device cuda or --model tiny")
    if args.in_process:
        dtypes = {VARIANTS[v].dtype or DEFAULT_DTYPE[args.device] for v in args.variants}
        if len(dtypes) > 1:  # accelerate keeps one mixed-precision setting per process
            p.error(f"--in-process needs variants of one dtype, got {sorted(dtypes)}: drop --in-process")
    return args


def environment(device: str) -> dict:
    """Where and with what the numbers were taken."""
    import accelerate
    import diffusers
    import peft
    import torch

    if device == "cuda":
        name = torch.cuda.get_device_name(0)
    else:
        name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                    platform.processor()) if os.path.isfile("/proc/cpuinfo") else platform.processor()
        name = f"{name} ({os.cpu_count()} logical CPUs)"
    return {"device": device, "device_name": name, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def run_worker_process(args, name: str) -> dict:
    """Run one variant in a fresh interpreter (clean memory peak, clean accelerate state)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--device", args.device,
               "--output", args.output, "--rounds", str(args.rounds), "--warmup", str(args.warmup),
               "--workdir", args.workdir, "--cpu-threads", str(args.cpu_threads), "--variants", name,
               "--flops", str(args.flops), "--worker", name, "--worker-output", out] + (["--profile"] if args.profile else [])
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0 or not os.path.isfile(out):
            tail = proc.stdout.strip().splitlines()[-15:]
            print("\n".join(tail), file=sys.stderr)
            return {"variant": name, "status": "failed", "reason": f"exit code {proc.returncode}: "
                    + (tail[-1] if tail else "no output")}
        with open(out) as f:
            return json.load(f)


def _fmt(row: dict, key: str, scale: float = 1.0, digits: int = 3) -> str:
    value = row.get(key)
    return "-" if value is None else f"{value * scale:.{digits}g}"


def table(rows: list[dict]) -> str:
    """A fixed-width text table of the rows."""
    head = ["variant", "status", "s/round", "+-", "img/s", "rollout", "teacher", "backward", "optim",
            "peak GB", "teach MB", "GFLOP", "MFU %"]
    lines = [head]
    for r in rows:
        if r.get("status") != "ok":
            lines.append([r["variant"], r.get("status", "?"), r.get("reason", "")[:90]])
            continue
        ph = r["phases_seconds"]
        lines.append([r["variant"], "ok", f"{r['seconds_per_round']['mean']:.3g}",
                      f"{r['seconds_per_round']['std']:.2g}", _fmt(r, "images_per_second"),
                      *(f"{ph[k]:.3g}" for k in ("rollout", "teacher", "backward", "optimizer")),
                      _fmt(r, "peak_memory_gb"), f"{r['param_bytes']['teachers'] / 2**20:.4g}",
                      f"{r['flops_per_round'] / 1e9:.4g}", f"{100 * r['mfu']:.3g}"])
    widths = [max(len(line[i]) for line in lines if i < len(line) and len(line) == len(head)) for i in
              range(len(head))]
    out = []
    for line in lines:
        if len(line) == len(head):
            out.append("  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))))
        else:
            out.append("  ".join(line))
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.expected_flops:
        print(json.dumps(expected_round_flops(args.model), indent=1))
    if args.expected_memory:
        from diffusion_opd.budget import recipe_geometry, round_memory

        geometry = recipe_geometry(args.model)
        print(json.dumps({f"{strategy} x{n}": round_memory(args.model, geometry, strategy, n)
                          for strategy, n in (("ddp", 1), ("fsdp", 2), ("fsdp", 4), ("fsdp", 8))}, indent=1))
    if args.expected_flops or args.expected_memory:
        return 0
    paths = prepare_models(args.model, args.workdir, args.device)
    if args.prepare_only:
        print(f"models ready under {args.workdir}: {paths['pipeline']}")
        return 0
    kwargs = dict(model=args.model, device=args.device, paths=paths, rounds=args.rounds, warmup=args.warmup,
                  cpu_threads=args.cpu_threads, flops=args.flops or None, profile=args.profile)
    if args.worker:
        row = run_variant(args.worker, **kwargs)
        with open(args.worker_output, "w") as f:
            json.dump(row, f)
        return 0
    rows = []
    for name in args.variants:
        print(f"[benchmark] {args.model} on {args.device}: {name} ...", flush=True)
        row = run_variant(name, **kwargs) if args.in_process else run_worker_process(args, name)
        rows.append(row)
        if row.get("status") == "ok":
            print(f"[benchmark]   {row['seconds_per_round']['mean']:.3f} s/round, MFU {100 * row['mfu']:.2f}%",
                  flush=True)
        else:
            print(f"[benchmark]   {row['status']}: {row.get('reason')}", flush=True)
    result = {**environment(args.device), "model": args.model, "rounds": args.rounds, "warmup": args.warmup,
              "isolation": "in-process" if args.in_process else "one process per variant",
              "expected_flops": expected_round_flops(args.model), "variants": rows}
    ok = [r for r in rows if r.get("status") == "ok"]
    if args.device == "cuda" and args.model == "sd3.5-medium":  # a cost outside the round, see docs/benchmarks.md
        import torch

        offload = text_encoder_offload(torch.device("cuda"))
        tasks = len(ok[0]["geometry"]["teacher_guidance"]) if ok else 3
        result["text_encoder_offload"] = {**offload, "seconds_per_round": offload["seconds_per_encode_call"] * tasks}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{result['device_name']} | torch {result['torch']} | diffusers {result['diffusers']} | {result['date']}")
    print(table(rows))
    if "text_encoder_offload" in result:
        o = result["text_encoder_offload"]
        print(f"text encoders to the device and back ({o['bytes'] / 1e9:.1f} GB): {o['seconds_per_encode_call']:.2f} s "
              f"per encode call, {o['seconds_per_round']:.2f} s per round (one call per task)")
    print(f"\nwrote {args.output}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
