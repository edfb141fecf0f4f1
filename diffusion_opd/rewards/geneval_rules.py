"""GenEval's rules over detected objects, in pure Python/numpy (no model).

A metadata row (the official GenEval format) looks like::

    {"tag": "position", "prompt": "a photo of a cow right of a laptop",
     "include": [{"class": "laptop", "count": 1},
                 {"class": "cow", "count": 1, "position": ["right of", 0]}],
     "exclude": [{"class": "cow", "count": 2}]}              # exclude is optional

Three verdicts per image:

- ``correct`` (the official GenEval rule): every include clause finds at least ``count``
  objects of its class; colour and position are checked on the ``count`` most confident of
  them (all must have the colour; each must stand in the relation to every object matched by
  the target clause); a target clause that failed fails the clause pointing at it; any exclude
  clause with at least ``count`` objects makes the image wrong. Counting prompts carry an
  exclude clause of count n+1, which is what makes their count exact.
- ``strict_correct``: ``correct`` and every include clause found exactly ``count`` objects.
- ``score`` (dense training reward, as the peers' reward server): the mean of one term per
  include clause ``1 - |n - found| / n`` (not clipped, so many extra objects go below 0), plus
  a colour term (fraction of the n objects with the right colour; 0 when the count is not
  exact) and a position term (1 when every object satisfies the relation to every object of
  the target clause; 0 otherwise, or when either count is not exact). The peers append both a
  0 and a 1 when a position check fails (their loop falls through); here a failure is 0.

Detection filtering (``select_detections``): per class, keep scores > 0.3 (0.9 for the
counting tag, compared in float32), the 16 most confident (ties in the official
``np.argsort(scores)[::-1]`` order), no NMS (official NMS threshold 1.0). Relative position
uses box centres with a margin of 0.1 x the summed box sizes (``relative_position``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from ..data.coco import COLORS, RELATIONS, TAGS  # GenEval's vocabulary, defined once (re-exported here)

THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
NMS_THRESHOLD = 1.0  # 1.0 = no suppression, as the official evaluator
POSITION_MARGIN = 0.1


@dataclass
class Detection:
    """One detected object: box (x1, y1, x2, y2) in pixels, confidence, optional HxW bool mask,
    and its colour once a colour classifier has looked at it."""

    box: np.ndarray
    score: float
    mask: Optional[np.ndarray] = None
    color: Optional[str] = None


# (classname, objects) -> one colour name per object
ColorFn = Callable[[str, Sequence[Detection]], Sequence[str]]


@dataclass
class Verdict:
    """GenEval's verdicts for one image (see module docstring)."""

    correct: bool
    strict_correct: bool
    score: float
    reasons: list[str] = field(default_factory=list)


def validate_metadata(row: dict, classnames: Optional[Sequence[str]] = None) -> None:
    """Raise ValueError naming the problem when ``row`` is not a usable GenEval metadata row."""
    if not isinstance(row, dict):
        raise ValueError(f"geneval: metadata row must be a dict, got {type(row).__name__}")
    if row.get("tag") not in TAGS:
        raise ValueError(f"geneval: unknown tag {row.get('tag')!r}; valid tags: {', '.join(TAGS)}")
    include = row.get("include")
    if not include:
        raise ValueError(f"geneval: metadata row without include clauses: {row}")
    known = set(classnames) if classnames is not None else None
    for i, clause in enumerate(list(include) + list(row.get("exclude", []))):
        cls, count = clause.get("class"), clause.get("count")
        if known is not None and cls not in known:
            raise ValueError(f"geneval: class {cls!r} is not one of the detector's {len(known)} classes")
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"geneval: clause {clause} needs an integer count >= 1")
        if "color" in clause and clause["color"] not in COLORS:
            raise ValueError(f"geneval: colour {clause['color']!r} not in {', '.join(COLORS)}")
        if "position" in clause:
            rel, target = clause["position"]
            if rel not in RELATIONS or not (isinstance(target, int) and 0 <= target < i):
                raise ValueError(f"geneval: bad position {clause['position']} in clause {i} (relations: {RELATIONS})")


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def select_detections(
    raw: dict[str, Sequence[Detection]],
    tag: str,
    threshold: float = THRESHOLD,
    counting_threshold: float = COUNTING_THRESHOLD,
    max_objects: int = MAX_OBJECTS,
    nms_threshold: float = NMS_THRESHOLD,
) -> dict[str, list[Detection]]:
    """Per class: most confident first, above the tag's threshold, at most ``max_objects``,
    greedy NMS only when ``nms_threshold < 1``. Classes left empty are dropped.

    Two details follow the official ``evaluate_images.py`` bit for bit: the detector's scores
    are float32 and the threshold is compared in float32 (a score of exactly float32(0.3) is
    NOT above 0.3 there, although float(float32(0.3)) > 0.3 in float64), and objects are
    visited in the order ``np.argsort(scores)[::-1]``: tied scores come out in the order numpy's
    (unstable) default sort leaves them, reversed; not in the order the detector gave them.
    """
    cutoff = np.float32(counting_threshold if tag == "counting" else threshold)
    kept: dict[str, list[Detection]] = {}
    for cls, objects in raw.items():
        objects = list(objects)
        scores = np.asarray([o.score for o in objects], dtype=np.float32)
        order = np.argsort(scores)[::-1]
        order = order[scores[order] > cutoff][:max_objects]
        ranked = [objects[i] for i in order]
        chosen: list[Detection] = []
        for obj in ranked:
            if nms_threshold >= 1 or all(box_iou(obj.box, c.box) < nms_threshold for c in chosen):
                chosen.append(obj)
        if chosen:
            kept[cls] = chosen
    return kept


def relative_position(box_a: Sequence[float], box_b: Sequence[float], margin: float = POSITION_MARGIN) -> set[str]:
    """Relations of A to B ("left of", "right of", "above", "below"; image y grows downwards).

    The centre offset is shrunk on each axis by ``margin`` x (size of A + size of B) on that
    axis; a relation holds when the shrunk offset's component along it exceeds half the
    length of the raw offset. Boxes closer than the margin on both axes have no relation.
    """
    a = np.asarray(box_a[:4], dtype=np.float64).reshape(2, 2)
    b = np.asarray(box_b[:4], dtype=np.float64).reshape(2, 2)
    offset = a.mean(axis=0) - b.mean(axis=0)
    sizes = np.abs(a[1] - a[0]) + np.abs(b[1] - b[0])
    shrunk = np.sign(offset) * np.maximum(np.abs(offset) - margin * sizes, 0.0)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def require_preset_colors(cls: str, objects: Sequence[Detection]) -> list[str]:
    """Default colour function: only called for objects without a preset ``color``, so it
    refuses, naming the class (the scorer passes its CLIP classifier instead)."""
    raise ValueError(f"geneval: colour of a '{cls}' needed but no colour classifier was given")


def _colors(cls: str, objects: Sequence[Detection], classify: ColorFn) -> list[str]:
    """Colours of ``objects``, classifying only those not seen yet (cached on the Detection)."""
    todo = [o for o in objects if o.color is None]
    if todo:
        for obj, color in zip(todo, classify(cls, todo)):
            obj.color = color
    return [o.color for o in objects]


def _position_ok(objects, targets, relation: str, margin: float) -> bool:
    return all(relation in relative_position(o.box, t.box, margin) for o in objects for t in targets)


def evaluate(
    metadata: dict,
    detections: dict[str, Sequence[Detection]],
    classify_colors: ColorFn = require_preset_colors,
    margin: float = POSITION_MARGIN,
) -> Verdict:
    """GenEval's ``correct``, ``strict_correct`` and dense ``score`` for one image, from its
    filtered detections (``select_detections``) and its metadata row."""
    correct, reasons = True, []
    groups: list = []  # official: objects that satisfied each include clause, or None
    exact_groups: list = []  # dense: all objects of a clause whose count is exact, or None
    terms: list[float] = []
    all_exact = True
    for clause in metadata.get("include", []):
        cls, n = clause["class"], clause["count"]
        found = list(detections.get(cls, []))
        top = found[:n]
        exact = len(found) == n
        all_exact &= exact

        # Official rule on the n most confident objects.
        ok = len(top) >= n
        if not ok:
            reasons.append(f"expected {cls}>={n}, found {len(found)}")
        if ok and "color" in clause:
            colors = _colors(cls, top, classify_colors)
            ok = colors.count(clause["color"]) >= n
            if not ok:
                reasons.append(f"expected {n} {clause['color']} {cls}, found colours {colors}")
        if ok and "position" in clause:
            relation, target = clause["position"]
            ok = groups[target] is not None and _position_ok(top, groups[target], relation, margin)
            if not ok:
                reasons.append(f"expected {cls} {relation} clause {target}")
        correct &= ok
        groups.append(top if ok else None)

        # Dense score.
        terms.append(1.0 - abs(n - len(found)) / n)
        if "color" in clause:
            terms.append(_colors(cls, found, classify_colors).count(clause["color"]) / n if exact else 0.0)
        if "position" in clause:
            relation, target = clause["position"]
            targets = exact_groups[target]
            terms.append(float(exact and targets is not None and _position_ok(found, targets, relation, margin)))
        exact_groups.append(found if exact else None)

    for clause in metadata.get("exclude", []):
        found = len(detections.get(clause["class"], []))
        if found >= clause["count"]:
            correct = False
            reasons.append(f"expected {clause['class']}<{clause['count']}, found {found}")
    score = float(np.mean(terms)) if terms else 0.0
    return Verdict(correct=correct, strict_correct=correct and all_exact, score=score, reasons=reasons)
