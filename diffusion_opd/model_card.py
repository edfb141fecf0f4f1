"""The model card (``README.md``) written next to an exported adapter or pipeline: what the Hub
shows and indexes (``base_model``, tags), how the model was trained, how to load it with diffusers
and peft, and the run's last evaluation when there is one."""
from __future__ import annotations

import json
from typing import Optional

METHODS = {  # recipe -> (tag, one line on the method)
    "opd": ("on-policy-distillation",
            "multi-task on-policy distillation (DiffusionOPD, arXiv 2605.15055): the student samples its own "
            "trajectories and is trained to match each task's teacher on them"),
    "nft": ("diffusion-nft", "DiffusionNFT: reward fine-tuning on the forward process with positive / negative branches"),
    "grpo": ("flow-grpo", "Flow-GRPO: group-relative policy optimisation on SDE rollouts"),
}
FAMILY_TAGS = {"sd3": ["sd3", "stable-diffusion-3"], "flux": ["flux"], "flux2": ["flux", "flux2"],
               "qwen_image": ["qwen-image"], "wan": ["wan"]}
CARD_KEYS = ("recipe", "sample", "train", "lora", "tasks", "teachers")


def _family(base_model: str) -> Optional[str]:
    """The family a Hub id or folder name says (the tags only; the loader reads model_index.json)."""
    low = base_model.lower().replace("_", "-")
    for family, marks in (("qwen_image", ("qwen-image",)), ("flux2", ("flux.2", "flux2")), ("flux", ("flux",)),
                          ("wan", ("wan2", "wan-")), ("sd3", ("sd3", "stable-diffusion-3"))):
        if any(m in low for m in marks):
            return family
    return None


def _sample_line(video: bool) -> str:
    """The last line(s) of a loading snippet: an image, or a video's frames written as an mp4."""
    if video:
        return ("frames = pipe(\"a red apple rolling across a table\").frames[0]\n"
                "from diffusers.utils import export_to_video\nexport_to_video(frames, \"sample.mp4\", fps=16)")
    return "image = pipe(\"a photo of a red apple\").images[0]"


def _load_snippet(fmt: str, base_model: str, repo: str, second_expert: bool = False, video: bool = False) -> str:
    """The card's loading code; ``second_expert``: a two-expert adapter (Wan 2.2 A14B), whose
    low-noise expert's LoRA is in ``transformer_2/`` (models/lora.py); ``video``: the pipeline
    returns ``.frames``, not ``.images``."""
    if fmt == "merged":
        return (f"import torch\nfrom diffusers import DiffusionPipeline\n\n"
                f"pipe = DiffusionPipeline.from_pretrained(\"{repo}\", torch_dtype=torch.bfloat16).to(\"cuda\")\n"
                + _sample_line(video))
    if fmt == "peft":
        return (f"import torch\nfrom diffusers import DiffusionPipeline\nfrom peft import PeftModel\n\n"
                f"pipe = DiffusionPipeline.from_pretrained(\"{base_model}\", torch_dtype=torch.bfloat16).to(\"cuda\")\n"
                f"pipe.transformer = PeftModel.from_pretrained(pipe.transformer, \"{repo}\")\n"
                + (f"pipe.transformer_2 = PeftModel.from_pretrained(pipe.transformer_2, \"{repo}\", "
                   "subfolder=\"transformer_2\")\n" if second_expert else "")
                + _sample_line(video))
    return (f"import torch\nfrom diffusers import DiffusionPipeline\n\n"
            f"pipe = DiffusionPipeline.from_pretrained(\"{base_model}\", torch_dtype=torch.bfloat16).to(\"cuda\")\n"
            f"pipe.load_lora_weights(\"{repo}\")\n"
            + (f"pipe.load_lora_weights(\"{repo}\", weight_name=\"transformer_2/pytorch_lora_weights.safetensors\", "
               "load_into_transformer_2=True)\n" if second_expert else "")
            + _sample_line(video))


def model_card(*, base_model: str, fmt: str, config: dict, repo: str = "<this folder or repo>",
               source: str = "", evaluation: Optional[dict] = None, second_expert: bool = False,
               video: bool = False) -> str:
    """The card's text. ``config``: the training config of the checkpoint ({} when unknown, e.g. a
    peer checkpoint); ``evaluation``: ``{name: value}`` of the run's last evaluation, if any."""
    recipe = config.get("recipe", "")
    tag, method = METHODS.get(recipe, ("", "LoRA fine-tuning of a flow-matching diffusion model"))
    task = "text-to-video" if video else "text-to-image"
    tags = [task, "diffusers", "flow-matching", "diffusion-opd"] + (["lora"] if fmt != "merged" else [])
    tags += ([tag] if tag else []) + FAMILY_TAGS.get(_family(base_model) or "", [])
    front = ["---", f"base_model: {base_model}", f"library_name: {'peft' if fmt == 'peft' else 'diffusers'}",
             f"pipeline_tag: {task}", "tags:"] + [f"- {t}" for t in tags] + ["---", ""]
    name = config.get("run_name") or "diffusion_opd export"
    body = [f"# {name}", "", f"A {'merged pipeline' if fmt == 'merged' else f'{fmt}-format LoRA'} of "
            f"`{base_model}` trained with {method}, using the `diffusion_opd` library." + (f" Exported from `{source}`." if source else ""),
            "", "## How to load", "", "```python", _load_snippet(fmt, base_model, repo, second_expert, video), "```", ""]
    tasks = config.get("tasks") or {}
    if tasks:
        body += ["## Training", "", "| task | teacher | reward |", "|---|---|---|"]
        body += [f"| {t} | {s.get('teacher') or '-'} | {s.get('reward') or '-'} |" for t, s in tasks.items()]
        t = config.get("train", {})
        body += ["", f"{t.get('num_rounds')} rounds, learning rate {t.get('learning_rate')} "
                 f"({t.get('lr_schedule')}), LoRA rank {config.get('lora', {}).get('rank')} / alpha "
                 f"{config.get('lora', {}).get('alpha')}, {config.get('sample', {}).get('num_steps')} sampling steps "
                 f"at {config.get('sample', {}).get('resolution')} px.", ""]
    if evaluation:
        body += ["## Evaluation", "", "| metric | value |", "|---|---|"]
        body += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in evaluation.items()]
        body += [""]
    if config:
        shown = {k: config[k] for k in CARD_KEYS if k in config}
        body += ["<details><summary>Training config</summary>", "", "```json",
                 json.dumps(shown, indent=1, sort_keys=True, default=str), "```", "</details>", ""]
    return "\n".join(front + body)
