"""Prompt sets: one row per prompt, ``{"prompt": str, "metadata": dict}``.

Two file formats, as the public Flow-GRPO / DiffusionNFT prompt sets use them:

* ``.txt``: one prompt per line (blank lines skipped, surrounding whitespace stripped);
  metadata is ``{}``.
* ``.jsonl``: one JSON object per line with a ``"prompt"`` string; the whole object is kept as
  the metadata (GenEval rows carry ``tag``, ``include``, ``exclude`` that the reward needs).

Built-in datasets live under ``<root>/<name>/`` (default root ``dataset``), laid out as in the
Flow-GRPO repository; ``python scripts/download_data.py --dataset NAME`` fetches them. The
built-in video set ``video_motion`` (:mod:`diffusion_opd.data.video_prompts`) ships with the
package: no download. Video prompt files use the same two formats.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Mapping, Sequence, Union

from ..errors import ConfigError, UserError
from .video_prompts import VIDEO_PROMPT_SETS

PathLike = Union[str, Path]

# Relative paths under the data root, per dataset and split (Flow-GRPO's layout).
DATASET_FILES: dict[str, dict[str, str]] = {
    "geneval": {"train": "geneval/train_metadata.jsonl", "test": "geneval/test_metadata.jsonl"},
    "ocr": {"train": "ocr/train.txt", "test": "ocr/test.txt"},
    "pickscore": {"train": "pickscore/train.txt", "test": "pickscore/test.txt"},
    "drawbench": {"train": "drawbench/train.txt", "test": "drawbench/test.txt"},
}
SUPPORTED_SUFFIXES = (".txt", ".jsonl")


class PromptFileNotFoundError(UserError, FileNotFoundError):
    """A prompt file is missing; the message says where we looked and how to get it."""


class PromptDataset(Sequence):
    """An ordered list of prompt rows; ``ds[i]`` is ``{"prompt": str, "metadata": dict}``.

    ``source`` records where the rows came from (a path or a description) for error messages
    and evaluation records.
    """

    def __init__(self, rows: Sequence[Mapping], source: str = "<memory>"):
        self._rows: list[dict] = []
        for i, row in enumerate(rows):
            prompt = row.get("prompt") if isinstance(row, Mapping) else None
            if not isinstance(prompt, str):
                raise ValueError(f"{source}: row {i} has no 'prompt' string: {row!r}")
            metadata = row.get("metadata", {})
            if not isinstance(metadata, Mapping):
                raise ValueError(f"{source}: row {i} metadata is not a dict: {metadata!r}")
            self._rows.append({"prompt": prompt, "metadata": dict(metadata)})
        self.source = source

    @classmethod
    def from_prompts(cls, prompts: Sequence[str], source: str = "<memory>") -> "PromptDataset":
        """Rows with empty metadata from a list of prompt strings."""
        return cls([{"prompt": p, "metadata": {}} for p in prompts], source=source)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return PromptDataset(self._rows[index], source=self.source)
        return self._rows[index]

    def __iter__(self) -> Iterator[dict]:
        return iter(self._rows)

    def __repr__(self) -> str:
        return f"PromptDataset({len(self)} rows from {self.source})"

    @property
    def prompts(self) -> list[str]:
        """All prompt strings, in order."""
        return [r["prompt"] for r in self._rows]

    @property
    def metadata(self) -> list[dict]:
        """All metadata dicts, in order."""
        return [r["metadata"] for r in self._rows]

    def select(self, indices: Sequence[int]) -> "PromptDataset":
        """The rows at ``indices`` (e.g. those a :class:`PromptSampler` returns), in that order."""
        return PromptDataset([self._rows[i] for i in indices], source=self.source)


def _read_txt(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [{"prompt": line.strip(), "metadata": {}} for line in f if line.strip()]


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise ValueError(f"{path}:{lineno}: expected an object with a 'prompt' string")
            rows.append({"prompt": obj["prompt"], "metadata": obj})
    return rows


def load_prompt_file(path: PathLike) -> PromptDataset:
    """Read a ``.txt`` (one prompt per line) or ``.jsonl`` (GenEval metadata) prompt file."""
    path = Path(path)
    if path.suffix not in SUPPORTED_SUFFIXES:
        raise ValueError(f"{path}: unsupported prompt file type '{path.suffix}'; use one of {SUPPORTED_SUFFIXES}")
    if not path.is_file():
        raise PromptFileNotFoundError(f"prompt file not found: {path}")
    rows = _read_txt(path) if path.suffix == ".txt" else _read_jsonl(path)
    if not rows:
        raise ValueError(f"{path}: no prompts in file")
    return PromptDataset(rows, source=str(path))


def dataset_names() -> list[str]:
    """The built-in dataset names: the downloaded image sets and the packaged video sets."""
    return sorted([*DATASET_FILES, *VIDEO_PROMPT_SETS])


def packaged_prompts(name: str, split: str) -> PromptDataset:
    """A prompt set shipped inside the package (``video_motion``): ``split`` "train" or "test"."""
    splits = VIDEO_PROMPT_SETS[name]
    if split not in splits:
        raise ValueError(f"dataset '{name}' has no split '{split}'; valid splits: {', '.join(sorted(splits))}")
    return PromptDataset.from_prompts(splits[split], source=f"{name} ({split}, built in)")


def dataset_path(name: str, split: str, root: PathLike = "dataset") -> Path:
    """Where the built-in dataset ``name``'s ``split`` file lives under ``root``."""
    if name not in DATASET_FILES:
        raise ValueError(f"unknown dataset '{name}'; valid datasets: {', '.join(sorted(DATASET_FILES))}")
    splits = DATASET_FILES[name]
    if split not in splits:
        raise ValueError(f"dataset '{name}' has no split '{split}'; valid splits: {', '.join(sorted(splits))}")
    return Path(root) / splits[split]


def _missing_message(name: str, split: str, path: Path, root: PathLike) -> str:
    msg = (
        f"dataset '{name}' split '{split}' not found: looked at {path.resolve()}\n"
        f"Download it with:\n  python scripts/download_data.py --dataset {name} --root {root}"
    )
    if name == "geneval" and split == "train":
        msg += (
            "\nor generate GenEval-style training prompts with:\n"
            f"  python -m diffusion_opd.data.geneval_generator --n 5000 --seed 0 --out {path}"
        )
    return msg


def load_task_prompts(name_or_path: PathLike, split: str = "train", root: PathLike = "dataset") -> PromptDataset:
    """The prompts of a built-in dataset (``geneval``, ``ocr``, ``pickscore``, ``drawbench``; the
    packaged video set ``video_motion``), a prompt file, or a folder holding
    ``<split>_metadata.jsonl`` / ``<split>.txt``.

    Raises :class:`PromptFileNotFoundError` (a ``FileNotFoundError``) naming the path looked at
    and the download command when a built-in dataset's file is missing, and ``ValueError``
    listing the valid names for an unknown name.
    """
    text = str(name_or_path)
    if text in VIDEO_PROMPT_SETS:
        return packaged_prompts(text, split)
    if text in DATASET_FILES:
        path = dataset_path(text, split, root)
        if not path.is_file():
            raise PromptFileNotFoundError(_missing_message(text, split, path, root))
        return load_prompt_file(path)
    path = Path(text)
    if path.is_dir():
        candidates = [path / f"{split}_metadata.jsonl", path / f"{split}.txt"]
        for candidate in candidates:
            if candidate.is_file():
                return load_prompt_file(candidate)
        looked = ", ".join(str(c) for c in candidates)
        raise PromptFileNotFoundError(f"no '{split}' prompt file in folder {path}: looked for {looked}")
    if path.suffix in SUPPORTED_SUFFIXES or "/" in text or "\\" in text:
        return load_prompt_file(path)
    raise ValueError(
        f"unknown dataset '{text}'; valid datasets: {', '.join(dataset_names())} "
        f"(or give a path to a {' / '.join(SUPPORTED_SUFFIXES)} prompt file)"
    )


def task_prompts(config, task: str, split: str) -> PromptDataset:
    """The prompt rows of a run config's task: an inline list, a dataset name, or a file path.

    ``split`` "train" reads ``tasks.<task>.prompts``; "eval" reads ``eval_prompts`` (falling back
    to the dataset's test split of ``prompts``). Errors are :class:`ConfigError` naming the key.
    """
    spec = config.tasks[task]
    source = spec.prompts if split == "train" else (spec.eval_prompts or spec.prompts)
    key = f"tasks.{task}.{'prompts' if split == 'train' or not spec.eval_prompts else 'eval_prompts'}"
    if isinstance(source, (list, tuple)):
        if not source:
            raise ConfigError(f"{key}: empty prompt list")
        return PromptDataset.from_prompts(list(source), source=key)
    try:
        return load_task_prompts(source, "train" if split == "train" else "test", root=config.data_root)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"{key}: {err}") from None


def run_prompts(config, world_size: int) -> tuple[dict[str, PromptDataset], dict[str, PromptDataset]]:
    """Every task's training prompts (enough distinct ones to fill a round on every process)
    and, when ``eval.every`` is on, its held-out prompts: ``(train, eval)``, keyed by task."""
    from ..recipes import recipe_spec

    spec = recipe_spec(config.recipe)  # how many prompts a round draws is the recipe's to say
    per_round = spec.prompts_per_round(config) * world_size
    how = spec.prompts_text(config, world_size)
    train, held_out = {}, {}
    for name in config.tasks:
        train[name] = task_prompts(config, name, "train")
        if len(train[name]) < per_round:
            raise ConfigError(
                f"tasks.{name}.prompts: {len(train[name])} prompts cannot fill a round of {how} = {per_round} "
                "distinct prompts"
            )
        if config.eval.every:
            held_out[name] = task_prompts(config, name, "eval")
    return train, held_out
