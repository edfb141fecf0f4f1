#!/usr/bin/env python
"""Download the reward checkpoints into the layout the scorers look for (reward_ckpts/README.md).

    python scripts/download_reward_ckpts.py                    # every reward, default back ends
    python scripts/download_reward_ckpts.py --only geneval --only ocr
    python scripts/download_reward_ckpts.py --only geneval --optional   # + the mmdet checkpoint
    python scripts/download_reward_ckpts.py --dry-run          # print the plan, fetch nothing

What to fetch comes from each reward module's ``CHECKPOINTS`` dict: ``files`` of the Hub repo
``repo_id`` go to ``<root>/<local>/`` ("a|b": the first of a, b the repo has; a pattern with
``*``: every matching file); entries with ``url`` are plain HTTPS downloads; ``optional``
entries (non-default back ends, the UnifiedReward judge's weights) only with ``--optional``.
Files already present are kept (``--force`` fetches again). Needs internet and huggingface_hub.

Without a network the script finds out in seconds: ONE probe of the Hub (``$HF_ENDPOINT``, or
nothing at all with ``HF_HUB_OFFLINE=1``) with a ``--probe-timeout`` (5 s), then it stops and
prints every file still missing: where it goes, its size, where it comes from and the command
that fetches it on a machine with internet (copy the files over, then rerun to check).
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import time
import sys
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from diffusion_opd.errors import run_cli  # noqa: E402
from diffusion_opd.rewards import REGISTRY, ckpt_root, reward_names  # noqa: E402


def checkpoints_of(reward: str) -> dict:
    """The ``CHECKPOINTS`` dict of a reward's module (imports only that module)."""
    module = importlib.import_module(REGISTRY[reward].split(":")[0])
    return getattr(module, "CHECKPOINTS", {})


def plan(rewards: list[str], optional: bool) -> list[tuple[str, str, dict, str]]:
    """(reward, entry name, entry, shared_with) per entry; an entry whose folder an earlier one
    already fetches (rewards share CLIP-L) names that one in ``shared_with`` ("" otherwise)."""
    seen: dict[tuple, str] = {}
    out = []
    for reward in rewards:
        for name, entry in checkpoints_of(reward).items():
            if entry.get("optional") and not optional:
                continue
            key = (entry.get("repo_id"), entry.get("url"), entry.get("local"))
            shared = seen.get(key, "") if entry.get("files") else ""
            seen.setdefault(key, f"{reward}/{name}")
            out.append((reward, name, entry, shared))
    return out


def fetch_url(url: str, dest: Path) -> Path:
    """Stream ``url`` to ``dest`` through a temporary file (no half-written checkpoint on failure)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as out:
        shutil.copyfileobj(resp, out, length=1 << 20)
    os.replace(tmp, dest)
    return dest


def fetch_hub_file(repo_id: str, spec: str, folder: Path) -> list[Path]:
    """One file spec of a Hub repo into ``folder``: "a|b" alternatives or a "*" pattern."""
    from huggingface_hub import hf_hub_download, snapshot_download

    folder.mkdir(parents=True, exist_ok=True)
    if "*" in spec:
        snapshot_download(repo_id, allow_patterns=[spec], local_dir=folder)
        return sorted(p for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts)
    errors = []
    for name in spec.split("|"):
        try:
            return [Path(hf_hub_download(repo_id, name, local_dir=folder))]
        except Exception as err:  # try the next alternative, report all if none works
            errors.append(f"{name}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    raise RuntimeError(f"{repo_id}: none of {spec} could be fetched ({'; '.join(errors)})")


def present(folder: Path, spec: str) -> bool:
    """Whether a file spec is already satisfied in ``folder``."""
    if "*" in spec:
        return folder.is_dir() and any(folder.iterdir())
    return any((folder / name).is_file() for name in spec.split("|"))


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def probe_network(url: str, timeout: float) -> str:
    """"" when ``url`` answers anything at all (an HTTP error is an answer), else why not."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return ""
    except urllib.error.HTTPError:
        return ""
    except (urllib.error.URLError, OSError) as err:  # DNS, refused, timeout, TLS
        reason = getattr(err, "reason", err)
        return f"{type(reason).__name__}: {reason}"


def source_url(entry: dict, name: str) -> str:
    """Where one file of an entry comes from, as a URL a browser or wget can fetch."""
    if entry.get("url"):
        return entry["url"]
    return f"{hub_endpoint()}/{entry['repo_id']}/resolve/main/{name}"


def missing_files(todo: list[tuple[str, str, dict, str]], root: Path, force: bool) -> list[tuple[str, dict, list[str]]]:
    """(label, entry, missing file specs) for every entry with something left to fetch."""
    out = []
    for reward, name, entry, shared in todo:
        if shared or not entry.get("files"):
            continue
        missing = [spec for spec in entry["files"] if force or not present(root / entry["local"], spec)]
        if missing:
            out.append((f"{reward}/{name}", entry, missing))
    return out


def print_manual_plan(missing: list[tuple[str, dict, list[str]]], root: Path) -> None:
    """Every missing file: where it goes, its size, its source, and a command for a connected machine."""
    print(f"Files still missing under {root} (place them by hand, then rerun this script to check):")
    for label, entry, specs in missing:
        folder = root / entry["local"]
        size = re.search(r"(?:about )?\d[\d.]*\s*[KMGT]B", entry.get("purpose", ""))
        print(f"\n[{label}] {size.group(0) if size else 'small (no weights)'}: {entry.get('purpose', '')}")
        for spec in specs:
            first, *alternatives = spec.split("|")
            alt = f" (or {', '.join(alternatives)})" if alternatives else ""
            print(f"    {folder / first}{alt}\n        from {source_url(entry, first)}")
        if entry.get("url"):
            print(f"    on a connected machine: wget {entry['url']} -O {folder / specs[0]}")
        else:
            files = " ".join(spec.split("|")[0] for spec in specs)
            print(f"    on a connected machine: hf download {entry['repo_id']} {files} --local-dir {folder}")


def _size(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status (1 when something failed)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=None, help="checkpoint root (default: $DIFFUSION_OPD_REWARD_CKPTS or reward_ckpts)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help=f"reward(s) to fetch, repeatable or comma-separated: {', '.join(reward_names())}")
    parser.add_argument("--optional", action="store_true", help="also fetch optional back-end files")
    parser.add_argument("--force", action="store_true", help="fetch again even when present")
    parser.add_argument("--dry-run", action="store_true", help="print what would be fetched and exit")
    parser.add_argument("--probe-timeout", type=float, default=5.0,
                        help="seconds the one network probe may take before the script reports offline")
    args = parser.parse_args(argv)

    rewards = [n.strip() for item in args.only for n in item.split(",") if n.strip()] or reward_names()
    unknown = [n for n in rewards if n not in REGISTRY]
    if unknown:
        parser.error(f"unknown reward(s) {', '.join(unknown)}; valid rewards: {', '.join(reward_names())}")
    root = ckpt_root(args.root)
    todo = plan(rewards, args.optional)
    missing = missing_files(todo, root, args.force)
    if missing and not args.dry_run:
        needs_hub = any(not entry.get("url") for _, entry, _ in missing)
        target = hub_endpoint() if needs_hub else missing[0][1]["url"]
        start = time.perf_counter()
        offline = probe_network(target, args.probe_timeout)
        if offline:
            print(f"no network: {target} is unreachable ({offline}; one probe, {time.perf_counter() - start:.1f} s); "
                  "nothing was downloaded.\n")
            print_manual_plan(missing, root)
            return 1
    failures = []
    for reward, name, entry, shared in todo:
        files = entry.get("files") or []
        if not files:
            print(f"[{reward}/{name}] {entry.get('purpose', 'nothing to download')}")
            continue
        if shared:
            print(f"[{reward}/{name}] same files as {shared} (above)")
            continue
        folder = root / entry["local"]
        source = entry.get("url") or f"hf://{entry['repo_id']}"
        print(f"[{reward}/{name}] {entry.get('purpose', '')}\n    {source} -> {folder}")
        if args.dry_run:
            for spec in files:
                print(f"    would fetch {spec}")
            continue
        for spec in files:
            if present(folder, spec) and not args.force:
                print(f"    already present: {spec}")
                continue
            try:
                got = [fetch_url(entry["url"], folder / spec)] if entry.get("url") else fetch_hub_file(entry["repo_id"], spec, folder)
                for path in got:
                    print(f"    fetched {path} ({_size(path)})")
            except Exception as err:
                failures.append(f"{reward}/{name} {spec}: {err}")
                print(f"    FAILED {spec}: {err}")
    if failures:
        print(f"\n{len(failures)} download(s) failed:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print("\ndone" + (" (dry run)" if args.dry_run else f"; checkpoints under {root}"))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
