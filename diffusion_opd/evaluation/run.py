"""Evaluate a model on a prompt set: sample one image per prompt row, score it, summarise.

    python scripts/evaluation.py --dataset ocr --checkpoint_path outputs/mopd/checkpoints/round-300
    torchrun --nproc_per_node 8 scripts/evaluation.py --dataset geneval --lora_path quanhaol/DiffusionOPD \\
        --lora_subfolder Student/lora --resolution 1024

What is evaluated: the base model (no LoRA flag), one of our training checkpoints
(``--checkpoint_path``, optionally its EMA; Flow-GRPO / DiffusionNFT ``checkpoint-N/`` folders too), or any LoRA folder / Hub repo in PEFT or diffusers
format (``--lora_path`` [+ ``--lora_subfolder``]). The LoRA is loaded as a frozen adapter named
``evaluated`` on the backbone and sampled with that adapter; its own saved LoraConfig decides
rank and alpha.

Options are the training config's keys (``--eval.num_steps``, ``--sample.resolution``,
``--model.dtype``...); the older flag names (``--num_steps``, ``--resolution``,
``--mixed_precision``...) are aliases with the same meaning. ``--rewards`` takes the training
reward spec syntax: names, or a weighted sum ``ocr:1.0,pickscore:0.5`` (then also ``total``).

Reproducibility: sampling and scoring are the evaluation core's (``evaluation/core.py``), the
one the trainer's periodic evaluation uses: row ``i`` of the prompt set is sampled with seed
``eval_seed(--seed, i)``, so a checkpoint evaluated here with the run's seed, prompts and
sampling settings gives the trainer's ``eval/reward/<task>``. Rows are sharded by index
(rank ``r`` of ``W`` takes rows ``r, r + W, ...``), so an image depends on its row and the flags,
never on the number of processes. Results are gathered to rank 0 as ``(index, row)`` pairs,
sorted and de-duplicated by index, so no row is counted twice.

Outputs in ``--output_dir``: ``results.jsonl`` (one row per image: ``index``, ``prompt``,
``metadata``, ``seed``, numeric ``scores``, other reward ``outputs`` such as OCR's recognised
text, ``image`` path or null, ``nonfinite``: the sample diverged, its scores are null and it
counts as a failure, ``summary.json``'s ``nonfinite_samples``), ``summary.json`` /
``summary.md`` (``evaluation/summary.py``: for GenEval the official per-tag overall and the
labelled per-image mean), ``grid.png`` (the first 16 samples, each captioned with its prompt, row index
and seed) and ``images/`` with ``--save_images``.
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


from ..data.prompts import DATASET_FILES, PromptDataset, load_task_prompts
from ..data.video_prompts import VIDEO_PROMPT_SETS
from ..dtypes import DTYPE_NAMES
from ..errors import UserError, run_cli
from ..files import check_writable_folder, json_line
from ..trainers.checkpoint import LORA_FILES, LORA_WEIGHTS, model_of_checkpoint, resolve_checkpoint
from ..trainers.run_dir import LOCK_NAME, RunLock, move_aside
from ..trainers.visuals import captioned_grid
from ..video import frame_strip, is_video, write_mp4
from .summary import summarize, write_summary

__all__ = [
    "DATASET_REWARDS", "DEFAULT_MODEL", "EvalPlan", "build_parser", "default_rewards", "evaluate", "main",
    "parse_reward_options", "plan_from_args", "resolve_checkpoint", "shard_indices",
]

DEFAULT_MODEL = "stabilityai/stable-diffusion-3.5-medium"
MAX_GUIDANCE = 100.0  # CFG scales in use are <= 30; 1e30 or inf only produces NaN latents
# The name the evaluated LoRA gets on the backbone. Not "eval": peft keeps adapters in
# ModuleDicts keyed by name, and a key that is an nn.Module attribute cannot be registered.
EVAL_ADAPTER = "evaluated"
MODEL_REWARDS = ("pickscore", "clipscore", "hpsv2", "aesthetic", "imagereward")
DATASET_REWARDS: dict[str, tuple[str, ...]] = {
    "geneval": ("geneval",),
    "ocr": ("ocr",),
    "pickscore": MODEL_REWARDS,
    "drawbench": MODEL_REWARDS,
}
OPTIONAL_REWARD = "unifiedreward"  # joins the model-based set when a server URL / option is given
GRID_IMAGES = 16
PRECISIONS = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}  # --mixed_precision (an alias of --model.dtype)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w.-]+)*(@[\w./-]+)?$")  # owner/repo[/sub...][@rev]


# ----------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    """The command-line flags of ``scripts/evaluation.py``: the training config's key where one
    exists (``--eval.num_steps``), with the older flag name (``--num_steps``) as an alias."""
    p = argparse.ArgumentParser(description="Evaluate a text-to-image model on a prompt set.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", required=True,
                   help=f"one of: {', '.join(sorted(DATASET_FILES))}; the built-in video set "
                        f"{', '.join(VIDEO_PROMPT_SETS)} or a prompt file (.txt / .jsonl): both need --rewards")
    p.add_argument("--split", default="test")
    p.add_argument("--data_root", default="dataset", help="folder of scripts/download_data.py")
    p.add_argument("--model.path", "--model", dest="model", default=None,
                   help=f"Hub id or local pipeline folder, SD3 / SD3.5 or FLUX.1 (the family is read from its "
                        f"model_index.json; default: the checkpoint's model.path, else {DEFAULT_MODEL})")
    p.add_argument("--model.revision", "--revision", dest="revision", default=None)
    p.add_argument("--checkpoint_path", default=None,
                   help="a training checkpoint <output_dir>/checkpoints/round-N (or the output_dir: newest round), "
                        "or a Flow-GRPO / DiffusionNFT checkpoint-N/ (or checkpoint-N/lora, or their save_dir)")
    p.add_argument("--use_ema", action="store_true", help="evaluate the checkpoint's EMA weights")
    p.add_argument("--lora_path", "--lora_hf_path", dest="lora_path", default=None,
                   help="a LoRA folder (also a Flow-GRPO / DiffusionNFT checkpoint-N) or Hub repo, PEFT or diffusers "
                        "format; owner/repo/subfolder[@revision] works too (--lora_hf_path: DiffusionNFT's name)")
    p.add_argument("--lora_subfolder", default=None)
    p.add_argument("--eval.num_steps", "--num_steps", "--num_inference_steps", dest="num_steps", type=int, default=40,
                   help="sampling steps (--num_inference_steps: the peers' / diffusers' name)")
    p.add_argument("--sample.guidance_scale", "--guidance_scale", dest="guidance_scale", type=float, default=4.5,
                   help="CFG scale (SD3); for a guidance-distilled FLUX.1-dev the value of its guidance embedding "
                        "(FluxPipeline's default is 3.5)")
    p.add_argument("--model.guidance_scale_2", "--guidance_scale_2", dest="guidance_scale_2", type=float, default=None,
                   help="Wan 2.2 A14B: the low-noise expert's CFG scale (WanPipeline's guidance_scale_2; default: "
                        "--guidance_scale in both experts)")
    p.add_argument("--sample.resolution", "--resolution", dest="resolution", type=int, default=512,
                   help="image side in pixels (the paper's table: 1024)")
    p.add_argument("--solver", choices=("ode", "sde"), default="ode", help="ode: Euler flow matching")
    p.add_argument("--sample.noise_level", "--noise_level", dest="noise_level", type=float, default=None,
                   help="SDE eta (sde only; default 0.7)")
    p.add_argument("--seed", type=int, default=0, help="the run's seed: row i is sampled with eval_seed(seed, i)")
    p.add_argument("--batch_size", type=int, default=8, help="images per process per forward")
    p.add_argument("--model.dtype", dest="dtype", choices=DTYPE_NAMES, default=None,
                   help="dtype of the backbone weights (default fp32)")
    p.add_argument("--mixed_precision", choices=tuple(PRECISIONS), default=None,
                   help="older name of --model.dtype: no = fp32 (it sets the weights' dtype, not autocast)")
    p.add_argument("--model.max_sequence_length", "--max_sequence_length", dest="max_sequence_length", type=int,
                   default=128, help="T5 tokens")
    p.add_argument("--max_samples", type=int, default=None, help="evaluate the first N rows only")
    p.add_argument("--save_images", action="store_true", help="also write each image (videos: an mp4 + a frame strip PNG)")
    p.add_argument("--num_frames", type=int, default=0,
                   help="video models (Wan): frames per video, 1 + a multiple of 4 (0: the pipeline's 81)")
    p.add_argument("--fps", type=int, default=16, help="frame rate of the written mp4 files (Wan: 16)")
    p.add_argument("--output_dir", default=None, help="default: outputs/eval/<dataset>; a folder holding files is "
                   "refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="move what --output_dir holds to <output_dir>.previous-<time>/ first (nothing is deleted)")
    p.add_argument("--rewards", default=None,
                   help="reward names, comma-separated, or a weighted spec as in tasks.<name>.reward "
                        "(ocr:1.0,pickscore:0.5: also scores their weighted 'total'; default: the dataset's set)")
    p.add_argument("--eval.reward_device", "--reward_device", dest="reward_device", default="auto",
                   help="auto = this process's device")
    p.add_argument("--reward_option", action="append", default=[], metavar="REWARD.KEY=VALUE",
                   help="an option of one reward (JSON value, else a string); repeatable")
    p.add_argument("--remote_reward", action="append", default=[], metavar="NAME=URL",
                   help="score NAME on a reward server (python -m diffusion_opd.rewards.serve); repeatable")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def weight_dtype(args: argparse.Namespace) -> str:
    """The backbone's weight dtype: ``--model.dtype``, or its older name ``--mixed_precision``."""
    if args.dtype and args.mixed_precision and PRECISIONS[args.mixed_precision] != args.dtype:
        raise ValueError(f"--model.dtype {args.dtype} and --mixed_precision {args.mixed_precision} disagree; "
                         "give one (--mixed_precision is the older name of --model.dtype)")
    return args.dtype or PRECISIONS[args.mixed_precision or "no"]


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


def shard_indices(num_rows: int, rank: int, world_size: int) -> list[int]:
    """Rows of ``rank``: ``rank, rank + world_size, ...`` (no padding, no repeats)."""
    return list(range(rank, num_rows, world_size))


# ----------------------------------------------------------------------------- checkpoints
def _check_lora_source(path: str, subfolder: Optional[str]) -> None:
    """A local LoRA folder must hold weights; anything else must look like a Hub repo id."""
    from ..models.hub import adapter_folder

    if os.path.isdir(path):
        folder = Path(path) / (subfolder or "")
        if adapter_folder(str(folder)) is None:
            raise FileNotFoundError(f"--lora_path: no LoRA weights in {folder.resolve()} or its lora/ "
                                    f"(looked for {', '.join(LORA_FILES)})")
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
    weights: Optional[dict[str, float]] = None  # a weighted --rewards spec: its "total" is scored too
    name: str = ""  # the dataset's name, or the prompt file's stem


def _is_prompt_file(dataset: str) -> bool:
    return dataset not in DATASET_REWARDS and (os.path.isfile(dataset) or os.path.isdir(dataset))


def plan_from_args(args: argparse.Namespace) -> EvalPlan:
    """Validate every flag and load the prompt rows; no model is touched (errors come in ms)."""
    video_set = args.dataset in VIDEO_PROMPT_SETS
    if args.dataset not in DATASET_REWARDS and not video_set and not _is_prompt_file(args.dataset):
        raise ValueError(f"unknown dataset {args.dataset!r}; valid datasets: "
                         f"{', '.join(sorted([*DATASET_REWARDS, *VIDEO_PROMPT_SETS]))}, or a prompt file")
    if (video_set or _is_prompt_file(args.dataset)) and args.rewards is None:
        what = "the built-in video set" if video_set else "a prompt file"
        raise ValueError(f"--dataset {args.dataset}: {what} has no default rewards; name them with --rewards "
                         "(a video model: e.g. temporal_consistency,pickscore)")
    weight_dtype(args)
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
    if args.num_frames:  # a video model's frame count, before the VAE meets it
        from ..models.specs import check_num_frames

        check_num_frames(args.num_frames, key="--num_frames")
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
        model = model or model_of_checkpoint(config, round_dir)
        ours = os.path.isfile(os.path.join(folder, LORA_WEIGHTS))
        adapter = dict(name=EVAL_ADAPTER, path=folder, weight_name=LORA_WEIGHTS if ours else None)
    elif args.lora_path:
        _check_lora_source(args.lora_path, args.lora_subfolder)
        adapter = dict(name=EVAL_ADAPTER, path=args.lora_path, subfolder=args.lora_subfolder)
    model = model or DEFAULT_MODEL
    if os.path.exists(model) and not os.path.isfile(os.path.join(model, "model_index.json")):
        raise FileNotFoundError(f"--model: {Path(model).resolve()} is not a diffusers pipeline folder "
                                f"(no model_index.json)")

    rewards, weights = _plan_rewards(args)
    if args.num_frames:  # a video model: every reward must score frames (or whole videos)
        from ..rewards.video import check_video_rewards

        check_video_rewards(",".join(rewards), video=True)
    rows = load_task_prompts(args.dataset, args.split, args.data_root)
    if args.max_samples is not None:
        rows = rows[: args.max_samples]
    _check_reward_inputs(rewards, rows, args.reward_device)
    name = Path(args.dataset).stem if _is_prompt_file(args.dataset) else args.dataset
    output_dir = args.output_dir or os.path.join("outputs", "eval", name)
    check_writable_folder("--output_dir", output_dir)
    _check_output_dir(output_dir, args.overwrite)
    return EvalPlan(args, rows, model, adapter, rewards, output_dir, noise_level, weights, name)


def _plan_rewards(args) -> tuple[dict[str, dict], Optional[dict[str, float]]]:
    """{name: {"remote", "options"}} of every reward scored, and the weights of a weighted spec."""
    from ..rewards import check_reward_name, reward_weights

    options, remotes = parse_reward_options(args.reward_option), _parse_remotes(args.remote_reward)
    for name in [*options, *remotes]:
        check_reward_name(name)
    weights = None
    if args.rewards is not None and ":" in args.rewards:  # the training spec syntax, e.g. ocr:1.0,pickscore:0.5
        weights = reward_weights(args.rewards)
        names = list(weights)
    elif args.rewards is not None:
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
    return {n: {"remote": remotes.get(n), "options": options.get(n, {})} for n in dict.fromkeys(names)}, weights


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
def _png_bytes(image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- run
def _build_policy(plan: EvalPlan, device):
    """The evaluated model (+ the evaluated adapter as a teacher)."""
    from ..models import build_policy

    args = plan.args
    return build_policy(
        plan.model, revision=args.revision, dtype=weight_dtype(args), device=device,
        # The student adapter is never sampled here: the smallest one keeps memory down.
        lora=dict(rank=1, alpha=1),  # the family's default targets (they differ between families)
        teachers=[plan.adapter] if plan.adapter else [],
        max_sequence_length=args.max_sequence_length, num_frames=args.num_frames or None,
        guidance_scale_2=args.guidance_scale_2,
    )


def _scorer(scorers: dict, weights: Optional[dict[str, float]]):
    """Every reward's outputs under its own keys, plus the weighted ``total`` of a weighted spec
    (computed as the trainer's task scorer computes it)."""
    from ..rewards.multi import weighted_total

    def score(images, prompts, metadata) -> dict:
        out = {}
        for scorer in scorers.values():
            out.update(scorer(images, prompts, metadata))
        if weights:
            out["total"] = weighted_total(out, weights)
        return out

    return score


def evaluate(plan: EvalPlan) -> Optional[dict]:
    """Sample, score and summarise ``plan`` on every process (the evaluation core,
    :func:`~diffusion_opd.evaluation.core.evaluate_rows`); rank 0 writes the outputs and returns
    the summary (other ranks return None)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    from ..models.base import BASE
    from ..rollout import Sampling
    from .core import evaluate_rows

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
    sampling = Sampling(num_steps=args.num_steps, noise_level=plan.noise_level, guidance_scale=args.guidance_scale,
                        resolution=args.resolution)

    mine = shard_indices(len(plan.rows), rank, world)
    bar = tqdm(total=len(plan.rows), desc=f"eval {plan.name}", unit="img",
               disable=args.no_progress or not accelerator.is_main_process)
    grid_images = []

    def on_batch(records: list[dict], images: list) -> None:
        for record, image in zip(records, images):
            record["image"] = None
            record["nonfinite"] = record.pop("nonfinite")  # after image, as results.jsonl always had it
            video = is_video(image)  # a video model's sample: its frames
            if args.save_images:
                record["image"] = f"images/{record['index']:05d}.png"
                (frame_strip(image) if video else image).save(out_dir / record["image"])
                if video:
                    record["video"] = f"images/{record['index']:05d}.mp4"
                    write_mp4(image, str(out_dir / record["video"]), fps=args.fps)
            if record["index"] < GRID_IMAGES:
                grid_images.append((record["index"], (_png_bytes(frame_strip(image) if video else image),
                                                      record["prompt"], record["seed"])))
        # rank 0 reports for everyone: the ranks advance at the same pace, one batch at a time
        bar.update(min(len(plan.rows), bar.n + len(records) * world) - bar.n)

    records = evaluate_rows(policy, [plan.rows[i] for i in mine], mine, sampling, args.seed,
                            _scorer(scorers, plan.weights), adapter=EVAL_ADAPTER if plan.adapter else BASE,
                            batch_size=args.batch_size, on_batch=on_batch)
    bar.close()
    results = [(r["index"], r) for r in records]
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


def _write_outputs(plan: EvalPlan, records: list[dict], grid: list[tuple[int, tuple[bytes, str, int]]],
                   world: int) -> dict:
    import io

    from PIL import Image

    out_dir = Path(plan.output_dir)
    with open(out_dir / "results.jsonl", "w") as f:
        for record in records:
            f.write(json_line(record, sort_keys=False))
    summary = summarize(plan.name, records)
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
        "noise_level": plan.noise_level, "seed": args.seed, "dtype": weight_dtype(args),
        "split": args.split, "rewards": list(plan.rewards), "num_processes": world,
    }
    write_summary(summary, out_dir)
    captioned_grid([Image.open(io.BytesIO(png)) for _, (png, _, _) in grid], [prompt for _, (_, prompt, _) in grid],
                   [f"#{index} · seed {seed}" for index, (_, _, seed) in grid]).save(out_dir / "grid.png")
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
