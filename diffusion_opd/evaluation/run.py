"""Evaluate a model on a prompt set: sample one image per prompt row, score it, summarise.

    python scripts/evaluation.py --dataset ocr --checkpoint_path outputs/mopd/checkpoints/round-300
    torchrun --nproc_per_node 8 scripts/evaluation.py --dataset geneval --lora_path quanhaol/DiffusionOPD \\
        --lora_subfolder Student/lora --resolution 1024

What is evaluated: the base model (no LoRA flag), one of our training checkpoints
(``--checkpoint_path``, optionally its EMA; Flow-GRPO / DiffusionNFT ``checkpoint-N/`` folders too), or any LoRA folder / Hub repo in PEFT or diffusers
format (``--lora_path`` [+ ``--lora_subfolder``]). The LoRA is loaded as a frozen adapter named
``evaluated`` on the backbone and sampled with that adapter; its own saved LoraConfig decides
rank and alpha.

Reproducibility: row ``i`` of the prompt set is sampled with seed ``sample_seed(--seed, i)``
(the rollout seeds every sample from its own generator), and rows are sharded by index
(rank ``r`` of ``W`` takes rows ``r, r + W, ...``), so an image depends on its row and the flags,
never on the number of processes. Results are gathered to rank 0 as ``(index, row)`` pairs,
sorted and de-duplicated by index, so no row is counted twice.

Outputs in ``--output_dir``: ``results.jsonl`` (one row per image: ``index``, ``prompt``,
``metadata``, ``seed``, numeric ``scores``, other reward ``outputs`` such as OCR's recognised
text, ``image`` path or null, ``nonfinite``: the sample diverged, its scores are null and it
counts as a failure, ``summary.json``'s ``nonfinite_samples``), ``summary.json`` /
``summary.md`` (``evaluation/summary.py``: for GenEval the official per-tag overall and the
labelled per-image mean), ``grid.png`` (the first images) and ``images/`` with ``--save_images``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..data.prompts import DATASET_FILES, PromptDataset, load_task_prompts
from ..errors import UserError, run_cli
from ..files import MANIFEST, DamagedFileError, check_writable_folder, json_safe
from ..trainers.run_dir import LOCK_NAME, RunLock, move_aside
from .summary import summarize, write_summary

__all__ = [
    "DATASET_REWARDS", "DEFAULT_MODEL", "EvalPlan", "build_parser", "default_rewards", "evaluate", "main",
    "make_grid", "parse_reward_options", "plan_from_args", "resolve_checkpoint", "sample_seed", "shard_indices",
]

DEFAULT_MODEL = "stabilityai/stable-diffusion-3.5-medium"
MAX_GUIDANCE = 100.0  # CFG scales in use are <= 30; 1e30 or inf only produces NaN latents
# The name the evaluated LoRA gets on the backbone. Not "eval": peft keeps adapters in
# ModuleDicts keyed by name, and a key that is an nn.Module attribute cannot be registered.
EVAL_ADAPTER = "evaluated"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # what training checkpoints hold (diffusers format)
_LORA_FILES = ("adapter_model.safetensors", "adapter_model.bin", LORA_WEIGHTS, "pytorch_lora_weights.bin")
MODEL_REWARDS = ("pickscore", "clipscore", "hpsv2", "aesthetic", "imagereward")
DATASET_REWARDS: dict[str, tuple[str, ...]] = {
    "geneval": ("geneval",),
    "ocr": ("ocr",),
    "pickscore": MODEL_REWARDS,
    "drawbench": MODEL_REWARDS,
}
OPTIONAL_REWARD = "unifiedreward"  # joins the model-based set when a server URL / option is given
GRID_IMAGES = 16
PRECISIONS = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w.-]+)*(@[\w./-]+)?$")  # owner/repo[/sub...][@rev]


# ----------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    """The command-line flags of ``scripts/evaluation.py``."""
    p = argparse.ArgumentParser(description="Evaluate a text-to-image model on a prompt set.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", required=True, help=f"one of: {', '.join(sorted(DATASET_FILES))}")
    p.add_argument("--split", default="test")
    p.add_argument("--data_root", default="dataset", help="folder of scripts/download_data.py")
    p.add_argument("--model", default=None,
                   help=f"Hub id or local pipeline folder, SD3 / SD3.5 or FLUX.1 (the family is read from its "
                        f"model_index.json; default: the checkpoint's model.path, else {DEFAULT_MODEL})")
    p.add_argument("--revision", default=None)
    p.add_argument("--checkpoint_path", default=None,
                   help="a training checkpoint <output_dir>/checkpoints/round-N (or the output_dir: newest round), "
                        "or a Flow-GRPO / DiffusionNFT checkpoint-N/ (or checkpoint-N/lora, or their save_dir)")
    p.add_argument("--use_ema", action="store_true", help="evaluate the checkpoint's EMA weights")
    p.add_argument("--lora_path", "--lora_hf_path", dest="lora_path", default=None,
                   help="a LoRA folder (also a Flow-GRPO / DiffusionNFT checkpoint-N) or Hub repo, PEFT or diffusers "
                        "format; owner/repo/subfolder[@revision] works too (--lora_hf_path: DiffusionNFT's name)")
    p.add_argument("--lora_subfolder", default=None)
    p.add_argument("--num_steps", "--num_inference_steps", dest="num_steps", type=int, default=40,
                   help="sampling steps (--num_inference_steps: the peers' / diffusers' name)")
    p.add_argument("--guidance_scale", type=float, default=4.5,
                   help="CFG scale (SD3); for a guidance-distilled FLUX.1-dev the value of its guidance embedding "
                        "(FluxPipeline's default is 3.5)")
    p.add_argument("--resolution", type=int, default=512, help="image side in pixels (the paper's table: 1024)")
    p.add_argument("--solver", choices=("ode", "sde"), default="ode", help="ode: Euler flow matching")
    p.add_argument("--noise_level", type=float, default=None, help="SDE eta (sde only; default 0.7)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=8, help="images per process per forward")
    p.add_argument("--mixed_precision", choices=tuple(PRECISIONS), default="no",
                   help="dtype of the backbone weights (no = fp32)")
    p.add_argument("--max_sequence_length", type=int, default=128, help="T5 tokens")
    p.add_argument("--max_samples", type=int, default=None, help="evaluate the first N rows only")
    p.add_argument("--save_images", action="store_true")
    p.add_argument("--output_dir", default=None, help="default: outputs/eval/<dataset>; a folder holding files is "
                   "refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="move what --output_dir holds to <output_dir>.previous-<time>/ first (nothing is deleted)")
    p.add_argument("--rewards", default=None,
                   help="comma-separated reward names (default: the dataset's set)")
    p.add_argument("--reward_device", default="auto", help="auto = this process's device")
    p.add_argument("--reward_option", action="append", default=[], metavar="REWARD.KEY=VALUE",
                   help="an option of one reward (JSON value, else a string); repeatable")
    p.add_argument("--remote_reward", action="append", default=[], metavar="NAME=URL",
                   help="score NAME on a reward server (python -m diffusion_opd.rewards.serve); repeatable")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def _parse_value(text: str) -> Any:
    """``64`` -> 64, ``true`` -> True, ``0.5`` -> 0.5, anything not JSON -> the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_reward_options(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["geneval.image_size=64", ...]`` -> ``{"geneval": {"image_size": 64}}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, eq, value = item.partition("=")
        reward, dot, option = key.partition(".")
        if not eq or not dot or not reward or not option:
            raise ValueError(f"--reward_option {item!r}: expected REWARD.KEY=VALUE, e.g. geneval.image_size=800")
        out.setdefault(reward, {})[option] = _parse_value(value)
    return out


def _parse_remotes(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, eq, url = item.partition("=")
        if not eq or not name or not url.startswith(("http://", "https://")):
            raise ValueError(f"--remote_reward {item!r}: expected NAME=http://HOST:PORT")
        out[name] = url
    return out


def default_rewards(dataset: str, configured: Sequence[str] = ()) -> list[str]:
    """The rewards a dataset is scored with (as the peers do); UnifiedReward joins the
    model-based set only when ``configured`` (rewards given a server or options) names it."""
    names = list(DATASET_REWARDS[dataset])
    if names == list(MODEL_REWARDS) and OPTIONAL_REWARD in configured:
        names.append(OPTIONAL_REWARD)
    return names


def sample_seed(seed: int, index: int) -> int:
    """The seed of prompt row ``index``: a hash of (seed, index), so runs with nearby ``--seed``
    values share no noise, and a row's noise never depends on the process layout."""
    words = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index)]).generate_state(2, dtype=np.uint32)
    return int(words[0]) << 31 | int(words[1]) >> 1  # 63 bits: a non-negative int64, a valid torch seed


def shard_indices(num_rows: int, rank: int, world_size: int) -> list[int]:
    """Rows of ``rank``: ``rank, rank + world_size, ...`` (no padding, no repeats)."""
    return list(range(rank, num_rows, world_size))


# ----------------------------------------------------------------------------- checkpoints
PEFT_DIR = "lora"  # the PEFT copy in our round-N/ and the peers' checkpoint-N/ (Flow-GRPO, DiffusionNFT)
_PEER_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
NEITHER = ("is neither a checkpoint of this repo (<output_dir>/checkpoints/round-N/ holding {weights}) nor a "
           "Flow-GRPO / DiffusionNFT one (checkpoint-N/lora/ holding adapter_config.json); for any other LoRA "
           "folder use --lora_path")


def _is_peft_folder(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file() and any((folder / n).is_file() for n in _LORA_FILES[:2])


def _newest_peer_checkpoint(root: Path) -> Optional[Path]:
    """The newest ``checkpoints/checkpoint-N`` (peers' layout) holding a PEFT ``lora/``."""
    found = [(int(m.group(1)), d) for d in (root / "checkpoints").iterdir()
             if (m := _PEER_CHECKPOINT.match(d.name)) and _is_peft_folder(d / PEFT_DIR)]
    return max(found)[1] if found else None


def resolve_checkpoint(path: str, use_ema: bool = False) -> tuple[str, str, dict]:
    """(folder holding the LoRA weights, the checkpoint folder, its training config) of a checkpoint.

    Accepted: our ``<output_dir>/checkpoints/round-N`` (or its PEFT copy ``round-N/lora``) or a
    training ``output_dir`` (its newest complete round); the peers' (Flow-GRPO, DiffusionNFT)
    ``checkpoint-N/`` or ``checkpoint-N/lora`` or their ``save_dir`` (newest ``checkpoint-N``).
    Raises ``FileNotFoundError`` saying where it looked and what it expected.
    """
    from ..trainers.checkpoint import list_checkpoints

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(
            f"--checkpoint_path: no folder at {root.resolve()}. Training writes checkpoints to "
            f"<output_dir>/checkpoints/round-N/ (every save_every rounds and at the end).")
    if root.name == PEFT_DIR and (root.parent / LORA_WEIGHTS).is_file():
        root = root.parent  # our round-N/lora: the round itself (its EMA and config are beside)
    if not (root / LORA_WEIGHTS).is_file() and (root / "checkpoints").is_dir():
        found = list_checkpoints(str(root))
        peer = None if found else _newest_peer_checkpoint(root)
        if not found and peer is None:
            raise FileNotFoundError(f"--checkpoint_path: no complete checkpoint under {(root / 'checkpoints').resolve()} "
                                    "(neither round-N/ of this repo nor checkpoint-N/lora/ of Flow-GRPO / DiffusionNFT)")
        root = Path(found[-1][1]) if found else peer
    if not (root / LORA_WEIGHTS).is_file():  # the peers' layout: one PEFT folder, no separate EMA
        folder = root / PEFT_DIR if _is_peft_folder(root / PEFT_DIR) else root
        if not _is_peft_folder(folder):
            raise FileNotFoundError(f"--checkpoint_path: {root.resolve()} " + NEITHER.format(weights=LORA_WEIGHTS))
        if use_ema:
            raise FileNotFoundError(
                f"--checkpoint_path: {folder.resolve()} is a Flow-GRPO / DiffusionNFT checkpoint: it holds one set of "
                "LoRA weights (already the EMA ones when that run used EMA); drop --use_ema")
        return str(folder), str(root), {}
    folder = root / "ema" if use_ema else root
    if (root / MANIFEST).is_file():  # ours: every file as it was written, else the damaged one named
        from ..trainers.checkpoint import CheckpointError, verify

        try:
            verify(str(root))
        except CheckpointError as err:
            raise DamagedFileError(f"--checkpoint_path: {err}; use another checkpoint") from None
    if not (folder / LORA_WEIGHTS).is_file():
        hint = (" (the run was trained without EMA: train.ema_decay=0; drop --use_ema)"
                if use_ema and (root / LORA_WEIGHTS).is_file() else
                ". Expected a folder written by training (<output_dir>/checkpoints/round-N/); for any other LoRA "
                "folder use --lora_path")
        raise FileNotFoundError(f"--checkpoint_path: no LoRA weights at {(folder / LORA_WEIGHTS).resolve()}{hint}")
    config = {}
    if (root / "config.json").is_file():
        config = json.loads((root / "config.json").read_text())
    return str(folder), str(root), config


def _model_from_checkpoint(config: dict, checkpoint: str) -> Optional[str]:
    """The backbone a checkpoint was trained on (its config's model.path), if usable here."""
    path = (config.get("model") or {}).get("path")
    if not path:
        return None
    if path.startswith("builtin:"):  # a tiny model the trainer built under <output_dir>/builtin/<name>
        built = Path(checkpoint).parents[1] / "builtin" / path[len("builtin:"):]
        return str(built) if (built / "model_index.json").is_file() else None
    return path


def _check_lora_source(path: str, subfolder: Optional[str]) -> None:
    """A local LoRA folder must hold weights; anything else must look like a Hub repo id."""
    from ..models.hub import adapter_folder

    if os.path.isdir(path):
        folder = Path(path) / (subfolder or "")
        if adapter_folder(str(folder)) is None:
            raise FileNotFoundError(f"--lora_path: no LoRA weights in {folder.resolve()} or its lora/ "
                                    f"(looked for {', '.join(_LORA_FILES)})")
    elif not _HUB_ID.match(path):
        raise FileNotFoundError(f"--lora_path: {Path(path).resolve()} does not exist and {path!r} is not a Hub "
                                f"repo id (owner/repo[/subfolder][@revision])")


# ----------------------------------------------------------------------------- plan
@dataclass
class EvalPlan:
    """Everything an evaluation needs, checked; nothing loaded but the prompt rows."""

    args: argparse.Namespace
    rows: PromptDataset
    model: str
    adapter: Optional[dict]  # the LoRA as a teacher spec (name EVAL_ADAPTER), None for the base model
    rewards: dict[str, dict] = field(default_factory=dict)  # name -> {"remote": url|None, "options": {}}
    output_dir: str = ""
    noise_level: float = 0.0


def plan_from_args(args: argparse.Namespace) -> EvalPlan:
    """Validate every flag and load the prompt rows; no model is touched (errors come in ms)."""
    if args.dataset not in DATASET_REWARDS:
        raise ValueError(f"unknown dataset {args.dataset!r}; valid datasets: {', '.join(sorted(DATASET_REWARDS))}")
    for name in ("num_steps", "batch_size", "resolution", "max_sequence_length"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not (math.isfinite(args.guidance_scale) and 0 <= args.guidance_scale <= MAX_GUIDANCE):
        raise ValueError(f"--guidance_scale must be a finite number in [0, {MAX_GUIDANCE:g}], got {args.guidance_scale} "
                         "(the paper evaluates at 4.5; far above that the sampler leaves the image range)")
    if args.noise_level is not None and not math.isfinite(args.noise_level):
        raise ValueError(f"--noise_level must be a finite number, got {args.noise_level}")
    if args.max_samples is not None and args.max_samples < 1:
        raise ValueError(f"--max_samples must be >= 1, got {args.max_samples}")
    if args.resolution % 16:
        raise ValueError(f"--resolution must be a multiple of 16 (VAE x8, patch 2), got {args.resolution}")
    if args.solver == "ode":
        if args.noise_level not in (None, 0, 0.0):
            raise ValueError(f"--noise_level {args.noise_level} needs --solver sde (ode is deterministic)")
        noise_level = 0.0
    else:
        noise_level = 0.7 if args.noise_level is None else float(args.noise_level)
        if noise_level <= 0:
            raise ValueError(f"--solver sde needs --noise_level > 0, got {noise_level}")
    if args.checkpoint_path and args.lora_path:
        raise ValueError("give either --checkpoint_path (a training checkpoint) or --lora_path, not both")
    if args.use_ema and not args.checkpoint_path:
        raise ValueError("--use_ema applies to --checkpoint_path only")
    if args.lora_subfolder and not args.lora_path:
        raise ValueError("--lora_subfolder needs --lora_path")

    model, adapter = args.model, None
    if args.checkpoint_path:
        folder, round_dir, config = resolve_checkpoint(args.checkpoint_path, args.use_ema)
        model = model or _model_from_checkpoint(config, round_dir)
        ours = os.path.isfile(os.path.join(folder, LORA_WEIGHTS))
        adapter = dict(name=EVAL_ADAPTER, path=folder, weight_name=LORA_WEIGHTS if ours else None)
    elif args.lora_path:
        _check_lora_source(args.lora_path, args.lora_subfolder)
        adapter = dict(name=EVAL_ADAPTER, path=args.lora_path, subfolder=args.lora_subfolder)
    model = model or DEFAULT_MODEL
    if os.path.exists(model) and not os.path.isfile(os.path.join(model, "model_index.json")):
        raise FileNotFoundError(f"--model: {Path(model).resolve()} is not a diffusers pipeline folder "
                                f"(no model_index.json)")

    rewards = _plan_rewards(args)
    rows = load_task_prompts(args.dataset, args.split, args.data_root)
    if args.max_samples is not None:
        rows = rows[: args.max_samples]
    _check_reward_inputs(rewards, rows, args.reward_device)
    output_dir = args.output_dir or os.path.join("outputs", "eval", args.dataset)
    check_writable_folder("--output_dir", output_dir)
    _check_output_dir(output_dir, args.overwrite)
    return EvalPlan(args, rows, model, adapter, rewards, output_dir, noise_level)


def _plan_rewards(args) -> dict[str, dict]:
    from ..rewards import check_reward_name

    options, remotes = parse_reward_options(args.reward_option), _parse_remotes(args.remote_reward)
    for name in [*options, *remotes]:
        check_reward_name(name)
    if args.rewards is not None:
        names = [n.strip() for n in args.rewards.split(",") if n.strip()]
        if not names:
            raise ValueError("--rewards: give at least one reward name")
    else:
        names = default_rewards(args.dataset, [*options, *remotes])
    for name in names:
        check_reward_name(name)
    unused = sorted((set(options) | set(remotes)) - set(names))
    if unused:
        raise ValueError(f"options / servers given for reward(s) {unused} that are not evaluated "
                         f"(evaluated: {', '.join(names)}; change the set with --rewards)")
    return {n: {"remote": remotes.get(n), "options": options.get(n, {})} for n in dict.fromkeys(names)}


def _make_scorers(rewards: dict[str, dict], device: str) -> dict:
    """One scorer per reward (constructed, models not loaded yet)."""
    from ..rewards import load_reward

    scorers = {}
    for name, spec in rewards.items():
        opts = dict(spec["options"])
        if spec["remote"] is None:
            opts.setdefault("device", device)
        try:
            scorers[name] = load_reward(name, remote=spec["remote"], **opts)
        except TypeError as err:  # an unknown option name
            raise ValueError(f"reward '{name}': bad --reward_option ({err})") from None
    return scorers


def _check_reward_inputs(rewards: dict[str, dict], rows: PromptDataset, device: str) -> None:
    """Option names and every row's prompt / metadata checked by each scorer (no model load)."""
    scorers = _make_scorers(rewards, "cpu" if device == "auto" else device)
    for scorer in scorers.values():
        scorer.check_inputs(rows.prompts, rows.metadata)


# ----------------------------------------------------------------------------- images
def make_grid(images: Sequence, columns: Optional[int] = None):
    """Images (PIL, same size) tiled row-major into one PIL image, ``ceil(sqrt(n))`` columns."""
    from PIL import Image

    if not images:
        raise ValueError("make_grid: no images")
    n = len(images)
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB").resize((w, h)), ((i % columns) * w, (i // columns) * h))
    return grid


def _png_bytes(image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- run
def _build_policy(plan: EvalPlan, device):
    from ..models import build_policy

    args = plan.args
    return build_policy(
        plan.model, revision=args.revision, dtype=PRECISIONS[args.mixed_precision], device=device,
        # The student adapter is never sampled here: the smallest one keeps memory down.
        lora=dict(rank=1, alpha=1, target_modules=["attn.to_q"]),
        teachers=[plan.adapter] if plan.adapter else [],
        max_sequence_length=args.max_sequence_length,
    )


def _score_batch(scorers: dict, images, prompts, metadata) -> list[tuple[dict, dict]]:
    """Per image: (numeric scores, other outputs such as OCR's recognised text)."""
    out = [({}, {}) for _ in images]
    for name, scorer in scorers.items():
        result = scorer(images, prompts, metadata)
        for key, values in result.items():
            numeric = np.asarray(values).dtype.kind in "biuf"
            for i, value in enumerate(values):
                out[i][0 if numeric else 1][key] = json_safe(value)
    return out


def evaluate(plan: EvalPlan) -> Optional[dict]:
    """Sample, score and summarise ``plan`` on every process; rank 0 writes the outputs and
    returns the summary (other ranks return None)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    from ..models.base import BASE
    from ..rollout import rollout

    args = plan.args
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    world, rank = accelerator.num_processes, accelerator.process_index
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if world != launched:  # each rank would silently evaluate everything alone
        raise RuntimeError(f"launched with WORLD_SIZE={launched} but the accelerator sees {world} process(es)")
    out_dir = Path(plan.output_dir)
    lock = _claim_output_dir(plan, accelerator)  # held until this function returns (or the process ends)
    if accelerator.is_main_process:
        (out_dir / "images" if args.save_images else out_dir).mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    reward_device = str(accelerator.device) if args.reward_device == "auto" else args.reward_device
    scorers = _make_scorers(plan.rewards, reward_device)
    for scorer in scorers.values():  # a missing reward checkpoint fails before any sampling
        scorer.load()
    policy = _build_policy(plan, accelerator.device)
    adapter = EVAL_ADAPTER if plan.adapter else BASE

    mine = shard_indices(len(plan.rows), rank, world)
    batches = [mine[i:i + args.batch_size] for i in range(0, len(mine), args.batch_size)]
    bar = tqdm(total=len(plan.rows), desc=f"eval {args.dataset}", unit="img",
               disable=args.no_progress or not accelerator.is_main_process)
    results, grid_images = [], []
    for k, batch in enumerate(batches):
        rows = [plan.rows[i] for i in batch]
        prompts, metadata = [r["prompt"] for r in rows], [r["metadata"] for r in rows]
        seeds = [sample_seed(args.seed, i) for i in batch]
        with torch.no_grad():
            traj = rollout(policy, policy.encode_prompts(prompts), seeds, num_steps=args.num_steps,
                           noise_level=plan.noise_level, guidance_scale=args.guidance_scale,
                           resolution=args.resolution, adapter=adapter, keep_states=False)
            images = policy.decode(traj.latents)
            finite = torch.isfinite(traj.latents.flatten(1)).all(1).tolist()
        scores = _score_batch(scorers, images, prompts, metadata)
        for index, row, seed, image, (numeric, extra), ok in zip(batch, rows, seeds, images, scores, finite):
            if not ok:  # a sample that diverged: a failure, never the score of the image its NaNs decode to
                numeric = {key: None for key in numeric}
            record = {"index": index, "prompt": row["prompt"], "metadata": row["metadata"], "seed": seed,
                      "scores": numeric, "outputs": extra, "image": None, "nonfinite": not ok}
            if args.save_images:
                record["image"] = f"images/{index:05d}.png"
                image.save(out_dir / record["image"])
            if index < GRID_IMAGES:
                grid_images.append((index, _png_bytes(image)))
            results.append((index, record))
        # rank 0 reports for everyone: the ranks advance at the same pace, one batch at a time
        bar.update(min(len(plan.rows), (k + 1) * args.batch_size * world) - bar.n)
    bar.close()

    gathered = gather_object(results) if world > 1 else results
    grid = gather_object(grid_images) if world > 1 else grid_images
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return None
    records = sorted(dict(gathered).items())  # keyed by index: sorted, any duplicate dropped
    if [i for i, _ in records] != list(range(len(plan.rows))):
        raise RuntimeError(f"gathered {len(records)} rows for {len(plan.rows)} prompts")
    summary = _write_outputs(plan, [r for _, r in records], sorted(dict(grid).items()), world)
    accelerator.wait_for_everyone()
    if lock is not None:
        lock.release()
    return summary


def previous_outputs(output_dir: str) -> list[str]:
    """What ``output_dir`` already holds (the lock aside): another evaluation's or anyone's files."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(name for name in os.listdir(output_dir) if name != LOCK_NAME)


def _check_output_dir(output_dir: str, overwrite: bool) -> None:
    held = previous_outputs(output_dir)
    if held and not overwrite:
        raise ValueError(f"--output_dir: {output_dir} already holds {', '.join(held[:5])}{' ...' if len(held) > 5 else ''}; "
                         "choose another folder, or pass --overwrite (moves them to "
                         f"{output_dir.rstrip(os.sep)}.previous-<time>/, nothing is deleted)")


def _claim_output_dir(plan: EvalPlan, accelerator):
    """The trainer's folder rules for an evaluation: the lock (a second evaluation into the same
    folder fails at once, naming the first), a used folder refused, ``--overwrite`` moving the
    old files aside. Main process; every process raises the same one-line error."""
    from accelerate.utils import broadcast_object_list

    lock, outcome = None, [""]
    if accelerator.is_main_process:
        try:
            lock = RunLock(plan.output_dir).acquire()
            _check_output_dir(plan.output_dir, plan.args.overwrite)  # again, under the lock
            if previous_outputs(plan.output_dir):
                print(f"[eval] --overwrite: moved the previous files to {move_aside(plan.output_dir)}")
        except (UserError, ValueError) as err:
            if lock is not None:
                lock.release()
            outcome = [str(err)]
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome, from_process=0)
    if outcome[0]:
        raise UserError(outcome[0])
    return lock


def _write_outputs(plan: EvalPlan, records: list[dict], grid: list[tuple[int, bytes]], world: int) -> dict:
    import io

    from PIL import Image

    out_dir = Path(plan.output_dir)
    with open(out_dir / "results.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
    summary = summarize(plan.args.dataset, records)
    failed = sum(bool(r.get("nonfinite")) for r in records)
    summary["nonfinite_samples"] = failed
    if failed:
        print(f"warning: {failed} of {len(records)} samples diverged (non-finite latents): counted as failures, their "
              "scores are NaN (see nonfinite in results.jsonl); check the model, the adapter and --guidance_scale",
              file=sys.stderr, flush=True)
    args = plan.args
    summary["run"] = {
        "model": plan.model, "adapter": plan.adapter, "num_steps": args.num_steps,
        "guidance_scale": args.guidance_scale, "resolution": args.resolution, "solver": args.solver,
        "noise_level": plan.noise_level, "seed": args.seed, "mixed_precision": args.mixed_precision,
        "split": args.split, "rewards": list(plan.rewards), "num_processes": world,
    }
    write_summary(summary, out_dir)
    make_grid([Image.open(io.BytesIO(png)) for _, png in grid]).save(out_dir / "grid.png")
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point: validate, evaluate, print the headline. Exit code 2 on a usage error,
    1 when model or reward weights cannot be found (the message says how to get them); either
    is one line on stderr (:func:`diffusion_opd.errors.run_cli`)."""
    return run_cli(_main, list(sys.argv[1:] if argv is None else argv))


def _main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = plan_from_args(args)
    except (ValueError, FileNotFoundError) as err:  # argument checks: all usage errors
        if isinstance(err, UserError):
            raise
        raise UserError(str(err)) from None
    summary = evaluate(plan)  # HubUnavailableError / MissingCheckpointError are UserErrors (exit 1)
    if summary is not None:
        for key, value in summary["headline"].items():
            print(f"{key}: {value}")
        print(f"outputs in {plan.output_dir}")
    return 0
