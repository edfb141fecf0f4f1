"""`make demo` / `dopd-demo`: the paper's two claims, end to end on the CPU, in a toy world (minutes).

    dopd-demo [--quick] [--seed 0] [--output_dir outputs/demo]   (= python -m diffusion_opd.demo,
                                                                  = python scripts/demo.py)

1. pretrain a small flow-matching text-to-image model (8x8 pictures) on a base distribution;
2. stage 1: one teacher per task with the stage-1 RL recipes (config/demo.py);
3. stage 2: distil the three teachers into one student with OPD (ODE; SDE closed-form KL; the
   PPO-style ablation), with the same trainer, losses and sampling as the SD3.5 runs;
4. baselines from the same base with the same training images: multi-task NFT, cascade NFT;
5. measure and write outputs/demo/report.md, convergence.png, samples.png (results.json).

`--quick` is the shortened run the test suite checks.
"""
import argparse
import sys

from ..errors import run_cli


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the shortened run of the test suite")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    from .pipeline import run_demo

    results = run_demo(args.output_dir, "quick" if args.quick else "full", args.seed, not args.no_progress)
    print(f"\n[demo] {args.output_dir}/report.md, convergence.png, samples.png "
          f"({results['timings']['total']:.0f} s in all)")
    for claim in results["claims"]:
        print(f"[demo] {'held    ' if claim['held'] else 'NOT held'}  {claim['text']}: {claim['measured']}")
    return 0


def main(argv=None) -> int:
    """Exit code 0, or 2 with a user error as one line (diffusion_opd.errors.run_cli)."""
    return run_cli(_main, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
