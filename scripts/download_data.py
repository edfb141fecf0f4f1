#!/usr/bin/env python
"""Download the public prompt sets into ``--root`` (default ``dataset``), checksum-verified.

    python scripts/download_data.py --dataset geneval|ocr|pickscore|drawbench|all [--root dataset]
        [--split train|test|all] [--base-url URL] [--force] [--quiet]

Sources, checksums and the handling of unverified files: see diffusion_opd/data/download.py.
"""
from __future__ import annotations

import argparse
import logging
import sys

from diffusion_opd.data.download import MANIFEST, DownloadError, base_urls, download_dataset
from diffusion_opd.errors import run_cli


def main(argv=None) -> int:
    """Parse arguments, download, and return a process exit code."""
    parser = argparse.ArgumentParser(description="Download the public prompt sets (Flow-GRPO dataset/ folder).")
    parser.add_argument("--dataset", required=True, choices=sorted(MANIFEST) + ["all"])
    parser.add_argument("--root", default="dataset", help="data root (default: dataset)")
    parser.add_argument("--split", default="all", choices=["train", "test", "all"])
    parser.add_argument("--base-url", default=None,
                        help="one base URL holding <dataset>/<file> (default: Flow-GRPO, then DiffusionNFT)")
    parser.add_argument("--force", action="store_true", help="re-download files already present")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per connection")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    names = sorted(MANIFEST) if args.dataset == "all" else [args.dataset]
    splits = ("train", "test") if args.split == "all" else (args.split,)
    print(f"sources: {', '.join(base_urls(args.base_url))}")
    for name in names:
        try:
            paths = download_dataset(name, root=args.root, base_url=args.base_url, splits=splits,
                                     force=args.force, progress=not args.quiet, timeout=args.timeout)
        except (DownloadError, ValueError) as err:
            raise DownloadError(f"{name}: {err}") from None
        print(f"{name}: {len(paths)} file(s) ready under {args.root}: {', '.join(str(p) for p in paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
