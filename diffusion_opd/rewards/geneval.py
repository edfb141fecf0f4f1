"""GenEval reward: a COCO instance detector + CLIP zero-shot colours + GenEval's rules.

Pipeline per image: Mask2Former (Swin-S, COCO instances) -> per-class detections (box, score,
mask) -> ``geneval_rules.select_detections`` (confidence > 0.3, > 0.9 for counting, at most 16
per class) -> colours of the objects the rules ask about, by CLIP ViT-L-14 zero-shot over the
10 GenEval colours on the object's crop composited on grey #999 -> ``geneval_rules.evaluate``.

Keys: ``geneval`` (dense training score, float32), ``correct`` (official GenEval rule, bool),
``strict_correct`` (exact counts, bool). Needs ``metadata`` rows (official GenEval format).

Detector back ends (``detector=``):
- ``transformers`` (default): Mask2FormerForUniversalSegmentation, Hub id
  ``facebook/mask2former-swin-small-coco-instance`` (or a local folder). Pure PyTorch, no
  compiled ops. Images are resized to ``image_size`` on the short side (800 by default, the
  COCO test resize of the original evaluation) instead of the Hub processor's 384x384.
- ``mmdet``: the peers' model ``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco`` via mmdet 3.x,
  which needs an mmcv built with its compiled ops (see reward_ckpts/README.md); run it in its own
  environment behind ``python -m diffusion_opd.rewards.serve --reward geneval --option detector=mmdet``.
The transformers back end reproduces the post-processing of mmdet's Mask2Former head (top 100
query x class pairs, score = class probability x mask score, boxes from masks), so both back
ends hand the rules the same kind of detections.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..data.coco import COCO_CLASSES
from ..dtypes import dtype_name, parse_dtype
from . import geneval_rules as rules
from .base import MissingCheckpointError, Scorer, download_command, resolve_dir, resolve_file
from .base import ckpt_root as root_dir

# The detector's 80 COCO classes in its label order, spelled as GenEval's object_names.txt.
CLASSNAMES = COCO_CLASSES

MMDET_NAME = "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco"
MMDET_URL = (
    "https://download.openmmlab.com/mmdetection/v2.0/mask2former/" + MMDET_NAME + "/"
    + MMDET_NAME + "_20220504_001756-743b7d99.pth"
)

# Same schema as the other rewards: ``files`` of Hub repo ``repo_id`` go to ``<ckpt_root>/<local>/``;
# "a|b" means the first of a, b that the repo has; ``url`` entries are plain downloads;
# ``optional`` entries are only needed by a non-default back end.
CHECKPOINTS = {
    "detector": {
        "repo_id": "facebook/mask2former-swin-small-coco-instance",
        "files": ["config.json", "preprocessor_config.json", "model.safetensors|pytorch_model.bin"],
        "local": "geneval/mask2former-swin-small-coco-instance",
        "purpose": "Mask2Former Swin-S COCO instance detector, transformers back end (default, 280 MB)",
    },
    "clip": {
        "repo_id": "timm/vit_large_patch14_clip_224.openai",
        "files": ["open_clip_model.safetensors|open_clip_pytorch_model.bin"],
        "local": "geneval/clip",
        "purpose": "OpenAI CLIP ViT-L-14 in open_clip format, colour classification (both back ends, 1.7 GB)",
    },
    "detector_mmdet": {
        "repo_id": None,
        "url": MMDET_URL,
        "files": [f"{MMDET_NAME}.pth"],
        "local": "geneval",
        "optional": True,
        "purpose": "the peers' mmdet Mask2Former checkpoint, mmdet back end only (210 MB)",
    },
}


def _how_to_get(entry: str, root: Path) -> str:
    """Download command for one CHECKPOINTS entry (the script, then a manual equivalent)."""
    spec = CHECKPOINTS[entry]
    target = Path(root) / spec["local"]
    if spec.get("url"):
        return f"{download_command('geneval')} --optional\n  or: wget {spec['url']} -O {target / spec['files'][0]}"
    files = " ".join(f.split("|")[0] for f in spec["files"])
    return f"{download_command('geneval')}\n  or: hf download {spec['repo_id']} {files} --local-dir {target}"


COLOR_TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")
GREY = "#999"


# ----------------------------------------------------------------------------- post-processing
def boxes_from_masks(masks):
    """(N, H, W) bool -> (N, 4) float boxes (x1, y1, x2 + 1, y2 + 1) in pixels; zeros for empty masks."""
    import torch

    n = masks.shape[0]
    boxes = torch.zeros((n, 4), dtype=torch.float32, device=masks.device)
    if n == 0:
        return boxes
    cols, rows = masks.any(dim=1), masks.any(dim=2)  # (N, W), (N, H)
    nonempty = cols.any(dim=1)
    w_idx = torch.arange(masks.shape[2], device=masks.device)
    h_idx = torch.arange(masks.shape[1], device=masks.device)
    big = masks.shape[1] + masks.shape[2]
    boxes[:, 0] = torch.where(cols, w_idx, big).min(dim=1).values
    boxes[:, 1] = torch.where(rows, h_idx, big).min(dim=1).values
    boxes[:, 2] = torch.where(cols, w_idx, -1).max(dim=1).values + 1
    boxes[:, 3] = torch.where(rows, h_idx, -1).max(dim=1).values + 1
    boxes[~nonempty] = 0
    return boxes


def instances_from_queries(
    class_logits,
    mask_logits,
    valid_hw: tuple[int, int],
    padded_hw: tuple[int, int],
    out_hw: tuple[int, int],
    classnames: Sequence[str] = CLASSNAMES,
    top_k: int = 100,
    min_score: float = 0.0,
) -> dict[str, list[rules.Detection]]:
    """Instances of one image from Mask2Former's query outputs, as mmdet's Mask2Former head does:
    the ``top_k`` best (query, class) pairs by softmax probability (the no-object class
    dropped), masks upsampled to the padded input, cropped to the valid region, resized to the
    original image, binarised at logit 0, score = class probability x mean mask probability
    inside the mask, boxes from masks. Pairs whose class probability is <= ``min_score`` are
    dropped before upsampling (their final score cannot exceed it)."""
    import torch
    import torch.nn.functional as F

    probs = class_logits.float().softmax(-1)[:, :-1]
    num_classes = probs.shape[1]
    if num_classes != len(classnames):
        raise ValueError(f"geneval: detector predicts {num_classes} classes, expected {len(classnames)}")
    scores, flat = probs.flatten().topk(min(top_k, probs.numel()))
    keep = scores > min_score
    scores, flat = scores[keep], flat[keep]
    out: dict[str, list[rules.Detection]] = {}
    if scores.numel() == 0:
        return out
    queries, labels = flat // num_classes, flat % num_classes
    masks = mask_logits[queries].float()[None]
    masks = F.interpolate(masks, size=padded_hw, mode="bilinear", align_corners=False)
    masks = masks[:, :, : valid_hw[0], : valid_hw[1]]
    masks = F.interpolate(masks, size=out_hw, mode="bilinear", align_corners=False)[0]
    binary = masks > 0
    mask_scores = (masks.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    scores = scores * mask_scores
    boxes = boxes_from_masks(binary).cpu().numpy()
    binary, scores, labels = binary.cpu().numpy(), scores.cpu().numpy(), labels.cpu().numpy()
    for i in range(len(scores)):
        det = rules.Detection(box=boxes[i], score=float(scores[i]), mask=binary[i])
        out.setdefault(classnames[int(labels[i])], []).append(det)
    return out


def parse_mmdet_result(result: Any, classnames: Sequence[str] = CLASSNAMES) -> dict[str, list[rules.Detection]]:
    """Per-class detections from one mmdet result: 3.x ``DetDataSample`` (``pred_instances`` with
    bboxes, scores, labels, optional masks) or 2.x ``(bbox_results, segm_results)`` / ``bbox_results``
    with one (n, 5) array [x1, y1, x2, y2, score] per class."""
    out: dict[str, list[rules.Detection]] = {}
    pred = getattr(result, "pred_instances", None)
    if pred is not None:
        as_np = lambda t: t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)  # noqa: E731
        boxes, scores, labels = as_np(pred.bboxes), as_np(pred.scores), as_np(pred.labels)
        masks = as_np(pred.masks).astype(bool) if getattr(pred, "masks", None) is not None else None
        for i in range(len(scores)):
            det = rules.Detection(box=boxes[i, :4].astype(np.float64), score=float(scores[i]),
                                  mask=None if masks is None else masks[i])
            out.setdefault(classnames[int(labels[i])], []).append(det)
        return out
    bbox_results, segm_results = (result[0], result[1] if len(result) > 1 else None) if isinstance(result, tuple) else (result, None)
    if len(bbox_results) != len(classnames):
        raise ValueError(f"geneval: mmdet result has {len(bbox_results)} classes, expected {len(classnames)}")
    for c, arr in enumerate(bbox_results):
        arr = np.asarray(arr).reshape(-1, 5)
        for j in range(len(arr)):
            mask = None if segm_results is None else np.asarray(segm_results[c][j]).astype(bool)
            out.setdefault(classnames[c], []).append(rules.Detection(box=arr[j, :4].astype(np.float64), score=float(arr[j, 4]), mask=mask))
    return out


# ----------------------------------------------------------------------------- detectors
class TransformersMask2Former:
    """Mask2FormerForUniversalSegmentation + its image processor, from a local folder or Hub id."""

    def __init__(self, path: str, device: str, dtype: str = "fp32", image_size: Optional[int] = 800, top_k: int = 100, min_score: float = 0.0):
        from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

        self.torch_dtype = parse_dtype(dtype)
        self.processor = Mask2FormerImageProcessor.from_pretrained(path)
        if image_size:
            # Keep the aspect ratio (the processor's Hub config squashes to 384x384).
            self.processor.size = {"shortest_edge": int(image_size), "longest_edge": max(1333, int(image_size))}
        self.model = Mask2FormerForUniversalSegmentation.from_pretrained(path, dtype=self.torch_dtype).to(device).eval()
        self.device, self.top_k, self.min_score = device, top_k, min_score

    def detect(self, images: list) -> list[dict[str, list[rules.Detection]]]:
        """Raw per-class detections for each PIL image (before GenEval's filtering)."""
        import torch

        inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device, self.torch_dtype)
        pixel_mask = inputs.get("pixel_mask")
        with torch.no_grad():
            out = self.model(pixel_values=pixel_values, pixel_mask=None if pixel_mask is None else pixel_mask.to(self.device))
        padded = tuple(pixel_values.shape[-2:])
        results = []
        for i, image in enumerate(images):
            if pixel_mask is None:
                valid = padded
            else:  # the processor pads each image at the bottom/right up to the batch's size
                valid = (int(pixel_mask[i].any(dim=1).sum()), int(pixel_mask[i].any(dim=0).sum()))
            results.append(
                instances_from_queries(
                    out.class_queries_logits[i], out.masks_queries_logits[i], valid, padded,
                    (image.height, image.width), top_k=self.top_k, min_score=self.min_score,
                )
            )
        return results


class MMDetMask2Former:
    """The peers' mmdet Mask2Former (needs mmdet 3.x and an mmcv with compiled ops)."""

    def __init__(self, config: str, checkpoint: str, device: str):
        try:
            from mmdet.apis import inference_detector, init_detector
        except ImportError as err:
            raise ImportError(
                "geneval detector 'mmdet' needs mmdet>=3.3 with an mmcv built with its ops "
                "(pip install mmengine 'setuptools<81' ninja; MMCV_WITH_OPS=1 pip install --no-build-isolation "
                "mmcv==2.1.0; pip install mmdet==3.3.0). Or use detector='transformers', or run this "
                "back end in its own environment behind `python -m diffusion_opd.rewards.serve --reward geneval "
                f"--option detector=mmdet` (import error: {err})"
            ) from err
        self._infer = inference_detector
        self.model = init_detector(str(config), str(checkpoint), device=device)

    def detect(self, images: list) -> list[dict[str, list[rules.Detection]]]:
        """Raw per-class detections for each PIL image (before GenEval's filtering)."""
        # mmdet reads arrays as OpenCV BGR, like the files the official evaluator loads.
        arrays = [np.ascontiguousarray(np.asarray(im.convert("RGB"))[:, :, ::-1]) for im in images]
        return [parse_mmdet_result(r) for r in self._infer(self.model, arrays)]


def find_mmdet_config(root: Path) -> Path:
    """The mmdet config file of the peers' model: next to the checkpoints, or inside mmdet."""
    candidates = [root / "geneval" / f"{MMDET_NAME}.py"]
    try:
        import mmdet

        base = Path(mmdet.__file__).parent
        candidates += [base / ".mim" / "configs" / "mask2former" / f"{MMDET_NAME}.py",
                       base.parent / "configs" / "mask2former" / f"{MMDET_NAME}.py"]
    except ImportError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    raise MissingCheckpointError("geneval", candidates, "pip install mmdet==3.3.0 (ships its configs under mmdet/.mim/configs)")


# ----------------------------------------------------------------------------- colours
class ColorClassifier:
    """CLIP zero-shot colour of object crops, over GenEval's 10 colours and 3 prompt templates."""

    def __init__(self, model_name: str, pretrained: Optional[str], device: str, quick_gelu: bool = True):
        import open_clip

        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=device, force_quick_gelu=quick_gelu
        )
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.device = device
        self._text: dict[str, Any] = {}

    def _classifier(self, cls: str):
        """(10, D) normalised text embeddings for ``cls``: per colour, the mean of its templates."""
        import torch

        if cls not in self._text:
            rows = []
            with torch.no_grad():
                for color in rules.COLORS:
                    tokens = self.tokenizer([t.format(c=color, cls=cls) for t in COLOR_TEMPLATES]).to(self.device)
                    emb = self.model.encode_text(tokens).float()
                    emb = emb / emb.norm(dim=-1, keepdim=True)
                    mean = emb.mean(dim=0)
                    rows.append(mean / mean.norm())
            self._text[cls] = torch.stack(rows)
        return self._text[cls]

    def crops(self, image, objects: Sequence[rules.Detection]) -> list:
        """Each object cut out of ``image``: pixels outside its mask painted grey, then cropped to its box."""
        from PIL import Image

        image = image.convert("RGB")
        blank = Image.new("RGB", image.size, GREY)
        out = []
        for obj in objects:
            picture = image
            if obj.mask is not None:
                if obj.mask.shape != (image.height, image.width):
                    raise ValueError(f"geneval: mask shape {obj.mask.shape} != image size {(image.height, image.width)}")
                picture = Image.composite(image, blank, Image.fromarray(obj.mask.astype(np.uint8) * 255))
            x1, y1, x2, y2 = [int(round(float(v))) for v in obj.box[:4]]
            x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)  # never an empty crop
            out.append(picture.crop((x1, y1, x2, y2)))
        return out

    def __call__(self, image, cls: str, objects: Sequence[rules.Detection]) -> list[str]:
        """One colour name per object."""
        import torch

        if not objects:
            return []
        batch = torch.stack([self.preprocess(c) for c in self.crops(image, objects)]).to(self.device)
        with torch.no_grad():
            emb = self.model.encode_image(batch).float()
        emb = emb / emb.norm(dim=-1, keepdim=True)
        best = (emb @ self._classifier(cls).T).argmax(dim=-1).tolist()
        return [rules.COLORS[i] for i in best]


# ----------------------------------------------------------------------------- scorer
class GenEvalScorer(Scorer):
    """``geneval``: dense score + official ``correct`` + ``strict_correct`` per image.

    Options: ``detector`` (transformers | mmdet), ``detector_path`` (local folder or Hub id of a
    transformers Mask2Former), ``image_size`` (short side for the transformers detector; 0 =
    processor config), ``mmdet_config`` / ``mmdet_checkpoint`` (files), ``clip_model`` (open_clip
    architecture, or a ``local-dir:``/``hf-hub:`` id), ``clip_pretrained`` (weights file or open_clip
    tag; default: the checkpoint root, then the Hub), ``dtype`` (fp32 | fp16 | bf16, detector),
    ``threshold`` / ``counting_threshold`` / ``max_objects`` / ``position_margin`` (GenEval's
    0.3 / 0.9 / 16 / 0.1), ``ckpt_root`` (checkpoint root).
    """

    name = "geneval"

    def __init__(
        self,
        device: str = "cpu",
        batch_size: int = 8,
        detector: str = "transformers",
        detector_path: Optional[str] = None,
        image_size: int = 800,
        mmdet_config: Optional[str] = None,
        mmdet_checkpoint: Optional[str] = None,
        clip_model: str = "ViT-L-14",
        clip_pretrained: Optional[str] = None,
        clip_quick_gelu: bool = True,
        dtype: str = "fp32",
        threshold: float = rules.THRESHOLD,
        counting_threshold: float = rules.COUNTING_THRESHOLD,
        max_objects: int = rules.MAX_OBJECTS,
        position_margin: float = rules.POSITION_MARGIN,
        ckpt_root: Optional[str] = None,
    ):
        if detector not in ("transformers", "mmdet"):
            raise ValueError(f"geneval: unknown detector '{detector}'; valid: transformers, mmdet")
        try:
            dtype_name(dtype)
        except ValueError as err:
            raise ValueError(f"geneval: {err}") from None
        super().__init__(device=device, batch_size=batch_size)
        self.detector_kind, self.detector_path, self.image_size = detector, detector_path, int(image_size)
        self.mmdet_config, self.mmdet_checkpoint = mmdet_config, mmdet_checkpoint
        self.clip_model, self.clip_pretrained, self.clip_quick_gelu = clip_model, clip_pretrained, bool(clip_quick_gelu)
        self.dtype = dtype
        self.thresholds = dict(threshold=float(threshold), counting_threshold=float(counting_threshold), max_objects=int(max_objects))
        self.position_margin = float(position_margin)
        self.root = root_dir(ckpt_root)
        self.detector = None
        self.colors: Optional[ColorClassifier] = None

    def check_inputs(self, prompts, metadata):
        """GenEval needs one valid official metadata row per image; checked before loading."""
        if metadata is None:
            raise ValueError(
                "geneval needs metadata rows (official GenEval format: tag, include, exclude; "
                "e.g. the rows of geneval/test_metadata.jsonl) passed as scorer(images, prompts, metadata)"
            )
        for row in metadata:
            rules.validate_metadata(row, CLASSNAMES)

    def _load(self) -> None:
        self.detector = self._load_detector()
        self.colors = ColorClassifier(self.clip_model, self._clip_weights(), self.device, self.clip_quick_gelu)

    def _load_detector(self):
        min_score = min(self.thresholds["threshold"], self.thresholds["counting_threshold"])
        if self.detector_kind == "transformers":
            spec, hint = CHECKPOINTS["detector"], _how_to_get("detector", self.root)
            if self.detector_path and Path(self.detector_path).is_dir():
                path = resolve_dir(self.name, [self.detector_path], how_to_get=hint)
            elif self.detector_path:  # a Hub id
                path = resolve_dir(self.name, [], hub_repo=self.detector_path, how_to_get=hint)
            else:
                path = resolve_dir(self.name, [self.root / spec["local"]], hub_repo=spec["repo_id"], how_to_get=hint)
            return TransformersMask2Former(path, self.device, self.dtype, self.image_size, min_score=min_score)
        spec = CHECKPOINTS["detector_mmdet"]
        config = Path(self.mmdet_config) if self.mmdet_config else find_mmdet_config(self.root)
        local = [self.root / spec["local"] / spec["files"][0], self.root / spec["local"] / Path(MMDET_URL).name]
        checkpoint = resolve_file(self.name, [self.mmdet_checkpoint] if self.mmdet_checkpoint else local,
                                  how_to_get=_how_to_get("detector_mmdet", self.root))
        return MMDetMask2Former(str(config), str(checkpoint), self.device)

    def _clip_weights(self) -> Optional[str]:
        """The CLIP weights to load: an explicit file or open_clip tag, nothing for a schema'd
        model id (it carries its weights), else the checkpoint root, then the Hub."""
        if self.clip_model.startswith(("local-dir:", "hf-hub:")):
            return None
        if self.clip_pretrained:
            return self.clip_pretrained
        spec = CHECKPOINTS["clip"]
        names = spec["files"][0].split("|")
        local = [self.root / spec["local"] / n for n in names]
        return str(resolve_file(self.name, local, spec["repo_id"], names, _how_to_get("clip", self.root)))

    def _score(self, images, prompts, metadata):
        raw = self.detector.detect(images)
        scores, correct, strict = [], [], []
        for image, detections, row in zip(images, raw, metadata):
            kept = rules.select_detections(detections, row["tag"], **self.thresholds)
            verdict = rules.evaluate(row, kept, lambda cls, objs, im=image: self.colors(im, cls, objs), self.position_margin)
            scores.append(verdict.score)
            correct.append(verdict.correct)
            strict.append(verdict.strict_correct)
        return {
            "geneval": np.asarray(scores, dtype=np.float32),
            "correct": np.asarray(correct, dtype=bool),
            "strict_correct": np.asarray(strict, dtype=bool),
        }
