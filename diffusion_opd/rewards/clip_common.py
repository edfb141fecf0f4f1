"""Helpers shared by the CLIP-family scorers (pickscore, clipscore, hpsv2, aesthetic, imagereward).

- ``to_pil`` / ``clip_preprocess``: the preprocessing all five originals use: PIL bicubic resize of
  the shorter side, centre crop, [0, 1] tensor, per-channel mean/std (OpenAI CLIP constants).
  It is torchvision's PIL path, i.e. the same arithmetic as OpenAI CLIP's / open_clip's
  ``_transform``, ImageReward's ``_transform`` and transformers' PIL ``CLIPImageProcessor``.
- ``HFClip``: a transformers ``CLIPModel`` + its tokenizer + its processor's image settings,
  returning L2-normalised, paired image / text features.
- ``ScoreMLP``: the 768-1024-128-64-16-1 linear head (no activations) shared by the LAION
  aesthetic predictor and ImageReward; its ``layers.{0,2,4,6,7}`` keys match both checkpoints.
- ``torch_dtype`` / ``load_torch_checkpoint``: option parsing and checkpoint loading.
"""
from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..dtypes import parse_dtype as torch_dtype  # a reward's dtype option -> torch dtype

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_pil(image: Any):
    """One image as an RGB PIL image.

    Accepts a PIL image; a numpy array HxWxC (uint8 0-255, or float 0-1); a torch tensor CxHxW
    (float 0-1 or uint8). Floats are quantised as ``round(x*255)`` like the peers do before
    handing rollouts to their reward models.
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        if image.ndim != 3:
            raise ValueError(f"a tensor image must be CxHxW, got shape {tuple(image.shape)}")
        image = image.detach().cpu().permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
            raise ValueError(f"an array image must be HxWxC with C in 1/3/4, got shape {image.shape}")
        if image.dtype != np.uint8:
            image = (np.clip(image.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
        if image.shape[-1] == 1:
            image = np.repeat(image, 3, axis=-1)
        return Image.fromarray(image).convert("RGB")
    raise TypeError(f"unsupported image type {type(image).__name__}; pass PIL images, HxWxC numpy arrays "
                    "or CxHxW torch tensors")


@dataclass(frozen=True)
class ImageSettings:
    """How to turn an image into model input: shorter side -> ``resize``, centre crop ``crop``."""

    resize: int = 224
    crop: int = 224
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD
    resample: int = 3  # PIL code: 3 = bicubic (all five originals), 2 = bilinear


def image_settings_from_processor(processor_dir: str | Path) -> ImageSettings:
    """Read size / crop / mean / std from a transformers ``preprocessor_config.json``."""
    path = Path(processor_dir) / "preprocessor_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no preprocessor_config.json in {processor_dir}")
    cfg = json.loads(path.read_text())

    def side(value, default):  # an int, or transformers' size dicts
        if value is None:
            return default
        if isinstance(value, dict):  # {"shortest_edge": n} or {"height": h, "width": w}
            return int(value.get("shortest_edge") or value.get("height"))
        return int(value)

    resize = side(cfg.get("size"), 224)
    crop = side(cfg.get("crop_size"), resize) if cfg.get("do_center_crop", True) else resize
    return ImageSettings(resize=resize, crop=crop, mean=tuple(cfg.get("image_mean", CLIP_MEAN)),
                         std=tuple(cfg.get("image_std", CLIP_STD)), resample=int(cfg.get("resample", 3)))


def clip_preprocess(images: Sequence[Any], settings: ImageSettings = ImageSettings()) -> torch.Tensor:
    """Images -> float32 tensor (B, 3, crop, crop): resize shorter side, centre crop, normalise."""
    from torchvision.transforms import functional as TF
    from torchvision.transforms import InterpolationMode

    modes = {3: InterpolationMode.BICUBIC, 2: InterpolationMode.BILINEAR}
    if settings.resample not in modes:
        raise ValueError(f"unsupported resample code {settings.resample}; valid: {sorted(modes)}")
    out = []
    for image in images:
        pil = TF.resize(to_pil(image), settings.resize, interpolation=modes[settings.resample])
        pil = TF.center_crop(pil, settings.crop)
        out.append(TF.normalize(TF.to_tensor(pil), settings.mean, settings.std))
    return torch.stack(out)


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    """Unit-norm rows, computed in float32."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True)


def _pooled(out: Any) -> torch.Tensor:
    # transformers 4 returns the projected features; transformers 5 returns an output object
    # whose pooler_output holds them.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class HFClip:
    """A transformers CLIP model with its tokenizer and image settings, for paired features."""

    def __init__(self, model_dir: str, processor_dir: str, device: str, dtype: torch.dtype):
        from transformers import AutoTokenizer, CLIPModel

        self.model = CLIPModel.from_pretrained(model_dir).to(device=device, dtype=dtype).eval()
        self.model.requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(processor_dir)
        self.settings = image_settings_from_processor(processor_dir)
        self.device, self.dtype = device, dtype
        self.max_length = self.model.config.text_config.max_position_embeddings  # 77 for CLIP

    @torch.no_grad()
    def image_features(self, images: Sequence[Any]) -> torch.Tensor:
        """(B, D) float32 unit vectors of the images."""
        pixels = clip_preprocess(images, self.settings).to(self.device, self.dtype)
        return l2_normalise(_pooled(self.model.get_image_features(pixel_values=pixels)))

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, D) float32 unit vectors of the prompts (truncated to 77 tokens)."""
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        return l2_normalise(_pooled(self.model.get_text_features(input_ids=tokens["input_ids"],
                                                                 attention_mask=tokens["attention_mask"])))


class ScoreMLP(nn.Module):
    """Linear head in_dim-1024-128-64-16-1 without activations (dropouts only matter in training,
    they are kept so that state-dict indices ``layers.0/2/4/6/7`` match the published files)."""

    def __init__(self, in_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_dim, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) -> (B,)."""
        return self.layers(x).squeeze(-1)

    @classmethod
    def from_state_dict(cls, state: dict, source: str) -> "ScoreMLP":
        """Build the head from ``layers.*`` weights (input size read from ``layers.0.weight``)."""
        if "layers.0.weight" not in state:
            raise ValueError(f"{source}: not a 768-1024-128-64-16-1 head (no 'layers.0.weight'; "
                             f"keys: {sorted(state)[:8]}...)")
        head = cls(int(state["layers.0.weight"].shape[1]))
        expected = set(head.state_dict())
        if set(state) != expected:
            raise ValueError(f"{source}: head keys differ; missing {sorted(expected - set(state))}, "
                             f"unexpected {sorted(set(state) - expected)}")
        head.load_state_dict({k: v.float() for k, v in state.items()})
        return head


def load_torch_checkpoint(path: str | Path) -> Any:
    """``torch.load`` on the CPU, tensors-only first; older files that pickle other objects are
    loaded in full with a warning (only point this at files from the documented sources)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        logger.warning("%s holds non-tensor objects; loading it with weights_only=False", path)
        return torch.load(path, map_location="cpu", weights_only=False)


# --- checkpoint resolution -------------------------------------------------------------------
# Every scorer module declares CHECKPOINTS = {item: {repo_id, files, local, purpose}}: ``files``
# are fetched from the Hub repo ``repo_id`` into ``<ckpt_root>/<local>/``. The helpers below
# turn one entry into a local path (explicit option > <ckpt_root>/<local> > HF cache / Hub),
# or a MissingCheckpointError that names the places and the exact commands.


def fetch_hint(reward: str, entry: dict, root: Path) -> str:
    """The download script command and the equivalent ``hf download`` line for one entry."""
    from .base import download_command

    files = " ".join(f"'{f}'" if "+" in f else f for f in entry["files"])
    return (f"{download_command(reward)}\n  or: hf download {entry['repo_id']} {files} "
            f"--local-dir {Path(root) / entry['local']}")


def _looks_like_hub_id(value: str) -> bool:
    return not Path(value).exists() and value.count("/") == 1 and not value.startswith((".", "/"))


def resolve_entry_dir(reward: str, entry: dict, root: Path, explicit: str | None = None,
                      marker: str = "config.json") -> str:
    """A folder for ``from_pretrained``: ``explicit`` (a folder or a Hub id) if given, else
    ``<root>/<local>``, else the entry's Hub repo (HF cache / download)."""
    from .base import resolve_dir

    if explicit:
        hub = str(explicit) if _looks_like_hub_id(str(explicit)) else None
        return resolve_dir(reward, [] if hub else [explicit], hub, marker, fetch_hint(reward, entry, root))
    # only the entry's files (plus alternatives written "a|b"), never the whole Hub repo
    patterns = [name for f in entry["files"] for name in f.split("|")]
    return resolve_dir(reward, [Path(root) / entry["local"]], entry["repo_id"], marker,
                       fetch_hint(reward, entry, root), allow_patterns=patterns)


def resolve_entry_file(reward: str, entry: dict, root: Path, explicit: str | None = None,
                       names: Sequence[str] | None = None) -> Path:
    """A checkpoint file: ``explicit`` if given, else ``<root>/<local>/<name>`` for each accepted
    name, else the entry's files from its Hub repo (HF cache / download)."""
    from .base import resolve_file

    hint = fetch_hint(reward, entry, root)
    if explicit:
        return resolve_file(reward, [explicit], None, (), hint)
    names = list(names or entry["files"])
    return resolve_file(reward, [Path(root) / entry["local"] / n for n in names], entry["repo_id"],
                        [n for n in names if n in entry["files"]], hint)


class HFClipScorer:
    """Mixin for scorers on a transformers CLIP model (clipscore, pickscore): the shared options
    and loading. Subclasses set ``MODEL_ENTRY`` (a ``CHECKPOINTS`` entry) and, when the
    tokenizer / image settings live in another repo, ``PROCESSOR_ENTRY``; they implement
    ``_score`` on ``self.clip`` (an :class:`HFClip`)."""

    MODEL_ENTRY: dict = {}
    PROCESSOR_ENTRY: dict | None = None  # None: the model folder holds the processor files too

    def __init__(self, device: str = "cpu", dtype: str = "float32", batch_size: int = 16,
                 model_path: str | None = None, processor_path: str | None = None,
                 ckpt_root: str | None = None):
        super().__init__(device=device, batch_size=batch_size)
        self.dtype = torch_dtype(dtype)
        self.model_path, self.processor_path, self.root = model_path, processor_path, ckpt_root

    def _load(self) -> None:
        from .base import ckpt_root

        root = ckpt_root(self.root)
        model_dir = resolve_entry_dir(self.name, self.MODEL_ENTRY, root, self.model_path)
        processor_dir = model_dir
        if self.PROCESSOR_ENTRY is not None or self.processor_path:
            processor_dir = resolve_entry_dir(self.name, self.PROCESSOR_ENTRY or self.MODEL_ENTRY, root,
                                              self.processor_path, marker="preprocessor_config.json")
        self.clip = HFClip(model_dir, processor_dir, self.device, self.dtype)
