"""Download the public prompt sets (Flow-GRPO's ``dataset/`` folder) with checksums.

Files come from ``<base>/<dataset>/<file>``, trying each base URL in turn on HTTP 404:

1. ``https://raw.githubusercontent.com/yifan123/flow_grpo/main/dataset`` (Flow-GRPO, MIT)
2. ``https://raw.githubusercontent.com/NVlabs/DiffusionNFT/main/dataset`` (DiffusionNFT, Apache-2.0,
   which carries the same prompt files)

``--base-url`` (or ``$DIFFUSION_OPD_DATA_BASE_URL``) replaces that list by one base, e.g. a
mirror or a local ``http.server``.

Checksums: the SHA-256 values below are those of the copies this project was developed and
tested with (taken from the two repositories above). Where upstream has since changed a file,
the download stops with a checksum error rather than silently evaluating on other prompts. One
independent check agrees: a third-party script pins Flow-GRPO's ``pickscore/test.txt`` to the
same hash as ours. The training splits of ``geneval`` and ``ocr`` had no reference copy: they
are fetched unverified (their hash is printed) and are optional (missing upstream -> warning).

Writes are atomic: a temporary file in the target folder, verified, then ``os.replace``.
"""
from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from tqdm import tqdm

from ..errors import UserError
from ..files import sha256_file
from .prompts import DATASET_FILES

log = logging.getLogger(__name__)

FLOW_GRPO_BASE_URL = "https://raw.githubusercontent.com/yifan123/flow_grpo/main/dataset"
DIFFUSION_NFT_BASE_URL = "https://raw.githubusercontent.com/NVlabs/DiffusionNFT/main/dataset"
DEFAULT_BASE_URLS: tuple[str, ...] = (FLOW_GRPO_BASE_URL, DIFFUSION_NFT_BASE_URL)
BASE_URL_ENV = "DIFFUSION_OPD_DATA_BASE_URL"


class DownloadError(UserError, RuntimeError):
    """A file could not be fetched or verified; the message says what to do."""

    exit_code = 1


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset: its path under the base URL / data root and what to expect."""

    relpath: str
    sha256: Optional[str]  # None: no reference copy, fetched unverified
    size: Optional[int]
    split: Optional[str]  # "train" / "test", or None for auxiliary files
    optional: bool = False  # missing upstream (404 everywhere) -> warning, not error


def _split(name: str, split: str, sha256: Optional[str], size: Optional[int], optional: bool = False) -> RemoteFile:
    return RemoteFile(DATASET_FILES[name][split], sha256, size, split, optional)


MANIFEST: dict[str, tuple[RemoteFile, ...]] = {
    "geneval": (
        _split("geneval", "test", "cec4b24b9fee7bac21c8f787054ecc8dc9ff831674037713a4cd35e0f0a74a28", 340835),
        _split("geneval", "train", None, None, optional=True),
        RemoteFile("geneval/object_names.txt", "608f6a0e5c8ca1c7a92b818430141fe268c85b7930b50f4160f1d65893b5bacd",
                   642, None, optional=True),
    ),
    "ocr": (
        _split("ocr", "test", "4dd8caf3ab6ade73bd376c7d14c6ca49b6eacfb1bd321e22c40714ae4a98d4dc", 217565),
        _split("ocr", "train", None, None, optional=True),
    ),
    "pickscore": (
        _split("pickscore", "train", "2f425adcbb9a6d0feee7c6c448e1cb83a1f71deca9434b803907e2578eca837f", 2906730),
        _split("pickscore", "test", "d75c025fa451866e70f7e36243f7cdd93095523cb51f5f9651f2ce3236d20262", 239891),
    ),
    "drawbench": (
        _split("drawbench", "test", "9006b98feabb94b28a2bc0c88de42fd4f31a9ec3c2a19e308a02c5385b7172f0", 65164),
        _split("drawbench", "train", "f75b1b05b9902dd77c14d986725424b8bccd93dda2dfddc2f4191d0bc37b276b", 111),
    ),
}


def base_urls(base_url: Optional[str] = None) -> tuple[str, ...]:
    """The base URLs to try: the explicit one, else ``$DIFFUSION_OPD_DATA_BASE_URL``, else the defaults."""
    chosen = base_url or os.environ.get(BASE_URL_ENV)
    return (chosen.rstrip("/"),) if chosen else DEFAULT_BASE_URLS


def _fetch(url: str, tmp: Path, desc: str, progress: bool, timeout: float) -> None:
    """Stream ``url`` into ``tmp`` (raises urllib errors unchanged)."""
    request = urllib.request.Request(url, headers={"User-Agent": "diffusion_opd-download"})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(tmp, "wb") as out:
        total = response.headers.get("Content-Length")
        with tqdm(total=int(total) if total else None, unit="B", unit_scale=True, desc=desc,
                  disable=not progress, leave=False) as bar:
            for block in iter(lambda: response.read(1 << 16), b""):
                out.write(block)
                bar.update(len(block))


def download_file(url: str, dest: Union[str, Path], sha256: Optional[str] = None, progress: bool = True,
                  timeout: float = 60.0) -> Path:
    """Fetch ``url`` to ``dest`` atomically, checking ``sha256`` when given.

    Raises ``urllib.error.HTTPError`` for HTTP errors (callers decide about 404) and
    :class:`DownloadError` when the server cannot be reached or the checksum differs; ``dest``
    is untouched and no temporary file is left behind on any error.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    try:
        try:
            _fetch(url, tmp, dest.name, progress, timeout)
        except urllib.error.HTTPError:
            raise
        except (urllib.error.URLError, OSError) as err:  # DNS, refused, timeout: offline
            reason = getattr(err, "reason", err)
            raise DownloadError(
                f"could not reach {url} ({reason}). Are you offline? Fetch the file on a machine with "
                f"network access and copy it to {dest}, or point --base-url at a mirror."
            ) from None
        if sha256 is not None:
            actual = sha256_file(tmp)
            if actual != sha256:
                raise DownloadError(
                    f"checksum mismatch for {url}:\n  expected sha256 {sha256}\n  got      sha256 {actual}\n"
                    f"The upstream file differs from the copy this project was tested with; not writing {dest}."
                )
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def download_dataset(name: str, root: Union[str, Path] = "dataset", base_url: Optional[str] = None,
                     splits: Sequence[str] = ("train", "test"), force: bool = False, progress: bool = True,
                     timeout: float = 60.0) -> list[Path]:
    """Fetch dataset ``name``'s files under ``root``; returns the paths present afterwards.

    A file already present with the right checksum is kept (``force`` re-downloads). One
    present with a different checksum is an error unless ``force``.
    """
    if name not in MANIFEST:
        raise ValueError(f"unknown dataset '{name}'; valid datasets: {', '.join(sorted(MANIFEST))}, all")
    bad = [s for s in splits if s not in ("train", "test")]
    if bad:
        raise ValueError(f"unknown splits {bad}; valid splits: train, test")
    bases = base_urls(base_url)
    done: list[Path] = []
    for remote in MANIFEST[name]:
        if remote.split is not None and remote.split not in splits:
            continue
        dest = Path(root) / remote.relpath
        if dest.exists() and not force:
            if remote.sha256 is not None and sha256_file(dest) != remote.sha256:
                raise DownloadError(
                    f"{dest} exists but its sha256 differs from the expected {remote.sha256}; "
                    f"re-download with --force (or move it away)"
                )
            log.info("%s: present, kept", dest)
            done.append(dest)
            continue
        tried = []
        for base in bases:
            url = f"{base}/{remote.relpath}"
            try:
                download_file(url, dest, remote.sha256, progress=progress, timeout=timeout)
            except urllib.error.HTTPError as err:
                tried.append(f"{url} (HTTP {err.code})")
                if err.code == 404:
                    continue
                raise DownloadError(f"HTTP {err.code} {err.reason} for {url}") from None
            if remote.sha256 is None:
                log.warning("%s: no reference checksum; fetched unverified, sha256 %s", dest, sha256_file(dest))
            log.info("%s: downloaded from %s", dest, url)
            done.append(dest)
            break
        else:
            listing = "\n  ".join(tried)
            if remote.optional:
                hint = (" Generate GenEval training prompts instead: python -m diffusion_opd.data.geneval_generator "
                        f"--n 5000 --seed 0 --out {dest}") if remote.relpath == DATASET_FILES["geneval"]["train"] else ""
                log.warning("%s: optional file not found upstream (tried %s).%s", remote.relpath, "; ".join(tried), hint)
                continue
            raise DownloadError(f"{remote.relpath}: not found (HTTP 404) at any source:\n  {listing}")
    return done
