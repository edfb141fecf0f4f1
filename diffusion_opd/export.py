"""Export a training checkpoint (raw or EMA weights) for use outside this repo.

    dopd-export outputs/mopd/checkpoints/round-300 --format diffusers --out exports/mopd-lora
    dopd-export outputs/mopd --use_ema --format peft --out exports/mopd-peft
    dopd-export outputs/mopd --format merged --out exports/mopd-pipeline --push_to_hub me/mopd
    (also: python -m diffusion_opd.export ..., python scripts/export.py ...)

Formats: ``diffusers`` (``pytorch_lora_weights.safetensors``: ``pipe.load_lora_weights(dir)``),
``peft`` (``adapter_config.json`` + ``adapter_model.safetensors``:
``PeftModel.from_pretrained(transformer, dir)``), ``merged`` (a full pipeline folder with the
LoRA fused into the transformer: ``DiffusionPipeline.from_pretrained(dir)``).

The checkpoint may be ours (``round-N/``, or the output_dir: its newest round) or a Flow-GRPO /
DiffusionNFT ``checkpoint-N/lora``. After writing, the export is CHECKED: images sampled on a
fixed seed from the exported files (loaded back as a separate adapter, or as the merged
backbone) are compared with the checkpoint's own; the largest pixel difference is printed and
the script fails when it exceeds ``--tolerance`` (LoRA formats: identical arithmetic, 0 expected;
merged: fp rounding of W + BA, a few levels of 255). ``--push_to_hub REPO`` uploads the folder
afterwards and needs a Hugging Face token (``hf auth login`` or ``HF_TOKEN``), checked first;
``--dry_run`` does everything but the upload (no token needed). Every export holds a model card
(``README.md``: base model, method, tags, config, how to load, the run's last evaluation).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import UserError, run_cli

FORMATS = ("diffusers", "peft", "merged")
CHECK_PROMPTS = ("a photo of a red apple on a wooden table", 'a street sign that says "OPEN"')
EXPORTED = "exported"  # adapter name of the re-loaded export during the check


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("checkpoint", help="round-N folder, a training output_dir, or a peers' checkpoint-N/lora")
    p.add_argument("--format", choices=FORMATS, required=True)
    p.add_argument("--out", required=True, help="folder to write (must not exist or be empty)")
    p.add_argument("--use_ema", action="store_true", help="export the checkpoint's EMA weights")
    p.add_argument("--model", default=None, help="backbone (default: the checkpoint's model.path)")
    p.add_argument("--push_to_hub", default=None, metavar="REPO", help="upload the folder to this Hub repo")
    p.add_argument("--dry_run", action="store_true", help="with --push_to_hub: write and check everything, upload nothing")
    p.add_argument("--no_check", action="store_true", help="skip the image check")
    p.add_argument("--resolution", type=int, default=None, help="check images (default: the run's sample.resolution)")
    p.add_argument("--num_steps", type=int, default=None, help="check sampling steps (default: the run's)")
    p.add_argument("--guidance_scale", type=float, default=None, help="check CFG (default: the run's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=None,
                   help="largest allowed pixel difference in [0, 255] (default 0 for LoRA formats, 8 for merged)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--eval_summary", default=None, help="a summary.json of the eval CLI to add to the model card")
    return p


def hub_token_or_error(repo: str) -> str:
    """The token ``--push_to_hub`` will use; a one-line error when there is none (before any work)."""
    from huggingface_hub import get_token

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ValueError(f"--push_to_hub {repo}: HF_HUB_OFFLINE is set; unset it on a machine with internet")
    token = get_token()
    if not token:
        raise ValueError(f"--push_to_hub {repo}: no Hugging Face token found; run `hf auth login` or set HF_TOKEN "
                         "(or drop --push_to_hub and upload the folder yourself)")
    return token


def check_output_dir(out: str) -> None:
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"--out {out}: already exists and is not empty; choose a new folder (nothing is overwritten)")


def sample_images(policy, adapter: str, settings: dict):
    """uint8 images of CHECK_PROMPTS on fixed seeds under ``adapter`` (deterministic ODE; a video
    model's videos as their frames)."""
    import numpy as np

    from .evaluation.core import eval_seed, sample_images as sample
    from .rollout import Sampling

    spec = Sampling(num_steps=settings["num_steps"], noise_level=0.0, guidance_scale=settings["guidance_scale"],
                    resolution=settings["resolution"], shift=settings["shift"])
    seeds = [eval_seed(settings["seed"], i) for i in range(len(CHECK_PROMPTS))]
    images = sample(policy, list(CHECK_PROMPTS), seeds, spec, adapter=adapter)
    frames = [f for im in images for f in (im if isinstance(im, list) else [im])]
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.int16) for im in frames])


def export(args) -> dict:
    """Write the export, check it, push it; returns what was done (for messages and tests)."""
    from .trainers.checkpoint import model_of_checkpoint, resolve_checkpoint
    from .models import build_policy
    from .models.base import BASE, STUDENT

    if args.push_to_hub and not args.dry_run:
        token = hub_token_or_error(args.push_to_hub)
    check_output_dir(args.out)
    if args.dry_run and not args.push_to_hub:
        raise ValueError("--dry_run: only with --push_to_hub (an export without it uploads nothing anyway)")
    if args.eval_summary and not os.path.isfile(args.eval_summary):
        raise ValueError(f"--eval_summary {args.eval_summary}: no such file (the eval CLI writes <output_dir>/summary.json)")
    folder, ckpt_dir, config = resolve_checkpoint(args.checkpoint, args.use_ema)
    model = args.model or model_of_checkpoint(config, ckpt_dir)
    if not model:
        raise ValueError(f"{args.checkpoint}: its backbone is not recorded (no config.json); pass --model")
    sample = config.get("sample", {})
    settings = dict(seed=args.seed, resolution=args.resolution or sample.get("resolution", 512),
                    num_steps=args.num_steps or sample.get("num_steps", 10),
                    guidance_scale=args.guidance_scale if args.guidance_scale is not None
                    else sample.get("guidance_scale", 4.5), shift=sample.get("shift") or None)

    # The student starts as exactly the checkpoint's adapter (model.student_init's loader); a video
    # run's frame count and Wan 2.2's low-noise CFG scale as the run sampled them.
    run_model = dict(num_frames=sample.get("num_frames") or None,
                     guidance_scale_2=config.get("model", {}).get("guidance_scale_2") or None)
    policy = build_policy(model, device=args.device, student_init=dict(path=folder), **run_model)
    if args.format == "merged" and not hasattr(policy, "save_merged_pipeline"):
        raise ValueError(f"--format merged: not available for {type(policy).__name__} (not a diffusers pipeline); "
                         "use --format diffusers or peft")
    if args.format == "diffusers":
        policy.save_student(args.out)
    elif args.format == "peft":
        policy.save_student_peft(args.out)
    else:
        policy.save_merged_pipeline(args.out)
    print(f"[export] wrote {args.format} export of {folder} to {args.out}")

    result = {"out": args.out, "max_pixel_diff": None}
    if not args.no_check:
        reference = sample_images(policy, STUDENT, settings)
        if args.format == "merged":
            exported = sample_images(build_policy(args.out, device=args.device, **run_model), BASE, settings)
        else:
            back = build_policy(model, device=args.device, teachers=[dict(name=EXPORTED, path=args.out)], **run_model)
            exported = sample_images(back, EXPORTED, settings)
        diff = float(abs(reference - exported).max())
        tolerance = args.tolerance if args.tolerance is not None else (8.0 if args.format == "merged" else 0.0)
        result["max_pixel_diff"] = diff
        print(f"[export] check: {len(CHECK_PROMPTS)} images at {settings['resolution']} px, {settings['num_steps']} "
              f"steps, seed {args.seed}: largest pixel difference {diff:g} / 255 (tolerance {tolerance:g})")
        if diff > tolerance:
            raise RuntimeError(f"the export does not reproduce the checkpoint's images: pixel difference {diff:g} > "
                               f"--tolerance {tolerance:g}; the folder {args.out} is left for inspection")
    write_model_card(args, model, config, ckpt_dir)
    if args.push_to_hub and args.dry_run:
        files = sorted(str(p.relative_to(args.out)) for p in Path(args.out).rglob("*") if p.is_file())
        print(f"[export] dry run: would push {len(files)} files of {args.out} to {args.push_to_hub} ({', '.join(files[:6])}"
              f"{', ...' if len(files) > 6 else ''})")
    elif args.push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(args.push_to_hub, exist_ok=True)
        api.upload_folder(folder_path=args.out, repo_id=args.push_to_hub)
        print(f"[export] pushed {args.out} to https://huggingface.co/{args.push_to_hub}")
    return result


def last_evaluation(checkpoint_dir: str) -> dict:
    """The ``eval/*`` numbers of the newest evaluation row of the run a checkpoint of ours belongs
    to (``<output_dir>/metrics.jsonl``), or {}."""
    from .trainers.metrics import read_metrics

    output_dir = Path(checkpoint_dir).parents[1] if len(Path(checkpoint_dir).parents) > 1 else None
    if output_dir is None or not (output_dir / "metrics.jsonl").is_file():
        return {}
    rows = [r for r in read_metrics(str(output_dir)) if any(k.startswith("eval/") for k in r)]
    if not rows:
        return {}
    return {"round": rows[-1]["round"], **{k: v for k, v in sorted(rows[-1].items()) if k.startswith("eval/")}}


def write_model_card(args, model: str, config: dict, checkpoint_dir: str) -> str:
    """``<out>/README.md`` (diffusion_opd.model_card); a summary.json of the eval CLI
    (``--eval_summary``) adds its headline to the run's last evaluation."""
    from .model_card import model_card

    evaluation = last_evaluation(checkpoint_dir)
    if args.eval_summary:
        with open(args.eval_summary) as f:
            evaluation.update({f"eval CLI: {k}": v for k, v in json.load(f).get("headline", {}).items()})
    path = os.path.join(args.out, "README.md")
    with open(path, "w") as f:
        f.write(model_card(base_model=model, fmt=args.format, config=config, repo=args.push_to_hub or args.out,
                           source=args.checkpoint, evaluation=evaluation,
                           second_expert=os.path.isdir(os.path.join(args.out, "transformer_2")),
                           video=bool(config.get("sample", {}).get("num_frames"))))
    return path


def main(argv=None) -> int:
    """Exit code 0, or 2 with the error as one line (diffusion_opd.errors.run_cli)."""
    return run_cli(_main, list(sys.argv[1:] if argv is None else argv))


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    try:
        export(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        if isinstance(err, UserError):
            raise
        raise UserError(str(err)) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
