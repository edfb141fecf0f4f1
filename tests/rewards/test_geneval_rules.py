"""GenEval rules on hand-made detections: all six tags, official vs strict vs dense score,
thresholds, the 16-object cap, the position margin, and the official metadata file."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from diffusion_opd.rewards.geneval_rules import (
    COLORS,
    TAGS,
    Detection,
    evaluate,
    relative_position,
    select_detections,
    validate_metadata,
)


def det(x1, y1, x2, y2, score=0.95, color=None):
    return Detection(box=np.array([x1, y1, x2, y2], dtype=np.float64), score=score, color=color)


def shared_datasets() -> Path:
    env = os.environ.get("DIFFUSION_OPD_SHARED_DATASETS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets"


# ----------------------------------------------------------------------------- filtering
def test_thresholds_depend_on_tag():
    raw = {"dog": [det(0, 0, 10, 10, 0.95), det(20, 0, 30, 10, 0.5), det(40, 0, 50, 10, 0.3)]}
    # > 0.3 (strict inequality, as the official evaluator) for every tag but counting ...
    assert [d.score for d in select_detections(raw, "two_object")["dog"]] == [0.95, 0.5]
    # ... and > 0.9 for counting.
    assert [d.score for d in select_detections(raw, "counting")["dog"]] == [0.95]
    # A class with nothing left disappears.
    assert select_detections({"cat": [det(0, 0, 1, 1, 0.2)]}, "single_object") == {}


def test_at_most_16_objects_per_class_most_confident_first():
    raw = {"apple": [det(i, 0, i + 1, 1, 0.31 + 0.03 * i) for i in range(20)]}
    kept = select_detections(raw, "single_object")["apple"]
    assert len(kept) == 16
    scores = [d.score for d in kept]
    assert scores == sorted(scores, reverse=True) and scores[0] == pytest.approx(0.31 + 0.03 * 19)


def test_optional_nms():
    raw = {"car": [det(0, 0, 10, 10, 0.9), det(1, 0, 11, 10, 0.8), det(50, 50, 60, 60, 0.7)]}
    assert len(select_detections(raw, "colors")["car"]) == 3  # official: no NMS
    assert len(select_detections(raw, "colors", nms_threshold=0.5)["car"]) == 2


# ----------------------------------------------------------------------------- position
def test_relative_position_margin():
    # Two 100x100 boxes side by side. Margin term = 0.1 * (100 + 100) = 20 px, and a relation
    # needs (|dx| - 20) / |dx| > 0.5, i.e. |dx| > 40 px.
    b = (0, 0, 100, 100)
    assert relative_position((41, 0, 141, 100), b) == {"right of"}
    assert relative_position((39, 0, 139, 100), b) == set()  # inside the margin: no relation
    assert relative_position((-41, 0, 59, 100), b) == {"left of"}
    assert relative_position((0, 60, 100, 160), b) == {"below"}  # image y grows downwards
    assert relative_position((0, -60, 100, 40), b) == {"above"}
    assert relative_position((5, 5, 95, 95), b) == set()  # concentric
    # Diagonal far away: both components exceed half the offset length.
    assert relative_position((300, 300, 400, 400), b) == {"right of", "below"}


# ----------------------------------------------------------------------------- six tags
def test_single_object():
    meta = {"tag": "single_object", "include": [{"class": "bowl", "count": 1}]}
    v = evaluate(meta, {"bowl": [det(0, 0, 10, 10)]})
    assert (v.correct, v.strict_correct, v.score) == (True, True, 1.0)
    v = evaluate(meta, {})
    assert (v.correct, v.strict_correct, v.score) == (False, False, 0.0)
    # Two bowls: official ">= n" passes, strict (exact) fails, dense 1 - |1-2|/1 = 0.
    v = evaluate(meta, {"bowl": [det(0, 0, 10, 10), det(20, 0, 30, 10)]})
    assert (v.correct, v.strict_correct, v.score) == (True, False, 0.0)
    # Three bowls: the dense count term is not clipped: 1 - 2/1 = -1.
    v = evaluate(meta, {"bowl": [det(0, 0, 1, 1)] * 3})
    assert v.score == -1.0


def test_two_object():
    meta = {"tag": "two_object", "include": [{"class": "zebra", "count": 1}, {"class": "chair", "count": 1}]}
    v = evaluate(meta, {"zebra": [det(0, 0, 10, 10)], "chair": [det(20, 0, 30, 10)]})
    assert (v.correct, v.strict_correct, v.score) == (True, True, 1.0)
    v = evaluate(meta, {"zebra": [det(0, 0, 10, 10)]})
    assert (v.correct, v.score) == (False, 0.5)  # terms: 1 and 1 - 1/1 = 0
    assert "chair" in v.reasons[0]


def test_counting_with_exclude():
    meta = {
        "tag": "counting",
        "include": [{"class": "wine glass", "count": 2}],
        "exclude": [{"class": "wine glass", "count": 3}],
    }
    two = [det(0, 0, 1, 1), det(2, 0, 3, 1)]
    v = evaluate(meta, {"wine glass": two})
    assert (v.correct, v.strict_correct, v.score) == (True, True, 1.0)
    # Three: include (>= 2) holds but the exclude clause (>= 3 present) fails the image.
    v = evaluate(meta, {"wine glass": two + [det(4, 0, 5, 1)]})
    assert (v.correct, v.strict_correct, v.score) == (False, False, 0.5)  # 1 - 1/2
    # One: too few.
    v = evaluate(meta, {"wine glass": two[:1]})
    assert (v.correct, v.strict_correct, v.score) == (False, False, 0.5)
    # Without the exclude clause, official counting is ">= n" and only strict is exact.
    v = evaluate({**meta, "exclude": []}, {"wine glass": two + [det(4, 0, 5, 1)]})
    assert (v.correct, v.strict_correct) == (True, False)


def test_colors_and_classifier_called_only_when_needed():
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    calls = []

    def classify(cls, objects):
        calls.append((cls, len(objects)))
        return ["red"] * len(objects)

    v = evaluate(meta, {"car": [det(0, 0, 10, 10)]}, classify)
    assert (v.correct, v.strict_correct, v.score) == (True, True, 1.0)
    assert calls == [("car", 1)]  # classified once, cached on the Detection for the dense score
    v = evaluate(meta, {"car": [det(0, 0, 10, 10, color="blue")]})
    assert (v.correct, v.score) == (False, 0.5)  # terms: count 1, colour 0/1
    # No car: colour term 0 and the classifier is never asked.
    calls.clear()
    assert evaluate(meta, {}, classify).score == 0.0 and calls == []
    # Colour needed but no classifier: clear error.
    with pytest.raises(ValueError, match="colour of a 'car'"):
        evaluate(meta, {"car": [det(0, 0, 10, 10)]})


def test_colors_official_uses_most_confident_only():
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    cars = [det(0, 0, 10, 10, 0.99, color="red"), det(20, 0, 30, 10, 0.5, color="blue")]
    v = evaluate(meta, {"car": cars})
    # Official: the top car is red -> correct. Strict: two cars -> not exact. Dense: count term
    # 1 - 1/1 = 0 and colour term 0 (count not exact) -> 0.
    assert (v.correct, v.strict_correct, v.score) == (True, False, 0.0)


def test_position_inside_and_outside_margin():
    meta = {
        "tag": "position",
        "include": [{"class": "laptop", "count": 1}, {"class": "cow", "count": 1, "position": ["right of", 0]}],
    }
    laptop = [det(0, 0, 100, 100)]
    v = evaluate(meta, {"laptop": laptop, "cow": [det(41, 0, 141, 100)]})
    assert (v.correct, v.strict_correct, v.score) == (True, True, 1.0)
    v = evaluate(meta, {"laptop": laptop, "cow": [det(39, 0, 139, 100)]})  # within the margin
    assert (v.correct, v.strict_correct) == (False, False)
    assert v.score == pytest.approx(2 / 3)  # terms: 1, 1, position 0
    v = evaluate(meta, {"laptop": laptop, "cow": [det(-200, 0, -100, 100)]})  # wrong side
    assert v.correct is False
    # Missing target: the position clause fails too; dense terms 0, 1, 0.
    v = evaluate(meta, {"cow": [det(200, 0, 300, 100)]})
    assert v.correct is False and v.score == pytest.approx(1 / 3)


def test_color_attr():
    meta = {
        "tag": "color_attr",
        "include": [{"class": "handbag", "count": 1, "color": "pink"}, {"class": "scissors", "count": 1, "color": "black"}],
    }
    good = {"handbag": [det(0, 0, 10, 10, color="pink")], "scissors": [det(20, 0, 30, 10, color="black")]}
    v = evaluate(meta, good)
    assert (v.correct, v.strict_correct, v.score) == (True, True, 1.0)
    swapped = {"handbag": [det(0, 0, 10, 10, color="black")], "scissors": [det(20, 0, 30, 10, color="pink")]}
    v = evaluate(meta, swapped)
    assert (v.correct, v.score) == (False, 0.5)  # counts right (1, 1), colours wrong (0, 0)


# ----------------------------------------------------------------------------- metadata
def test_validate_metadata_errors():
    validate_metadata({"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}, ["car"])
    with pytest.raises(ValueError, match="valid tags"):
        validate_metadata({"tag": "nope", "include": [{"class": "car", "count": 1}]})
    with pytest.raises(ValueError, match="not one of"):
        validate_metadata({"tag": "colors", "include": [{"class": "unicorn", "count": 1}]}, ["car"])
    with pytest.raises(ValueError, match="colour"):
        validate_metadata({"tag": "colors", "include": [{"class": "car", "count": 1, "color": "teal"}]})
    with pytest.raises(ValueError, match="bad position"):
        validate_metadata({"tag": "position", "include": [{"class": "car", "count": 1, "position": ["near", 0]}]})


def test_official_metadata_file_is_valid():
    path = shared_datasets() / "geneval" / "test_metadata.jsonl"
    if not path.is_file():
        pytest.skip(f"shared dataset not found at {path}")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    names = (shared_datasets() / "geneval" / "object_names.txt").read_text().split("\n")
    names = [n.strip() for n in names if n.strip()]
    assert len(names) == 80
    for row in rows:
        validate_metadata(row, names)
    assert {r["tag"] for r in rows} == set(TAGS)
    assert {c.get("color") for r in rows for c in r["include"]} - {None} <= set(COLORS)



# ----------------------------------------------------------------------------- official parity
def _official_order(scores, cutoff):
    """The selection lines of djghosh13/geneval evaluation/evaluate_images.py, on a float32
    score column (what mmdet returns): argsort, reverse, threshold, cap."""
    scores = np.asarray(scores, dtype=np.float32)
    ordering = np.argsort(scores)[::-1]
    ordering = ordering[scores[ordering] > cutoff]
    return ordering[:16].tolist()


def test_threshold_is_compared_in_float32_like_the_official_evaluator():
    at = float(np.float32(0.3))  # what a float32 detector score of "0.3" becomes in Python
    assert at > 0.3  # in float64 it is above the threshold ...
    just_above = float(np.nextafter(np.float32(0.3), np.float32(1)))
    raw = {"dog": [det(0, 0, 10, 10, at), det(20, 0, 30, 10, just_above)]}
    kept = select_detections(raw, "single_object")["dog"]
    # ... but the official evaluator compares in float32 and drops it; the next float32 stays.
    assert [d.score for d in kept] == [just_above]
    assert _official_order([at, just_above], 0.3) == [1]
    at_09 = float(np.float32(0.9))
    assert select_detections({"dog": [det(0, 0, 1, 1, at_09)]}, "counting") == {}
    assert _official_order([at_09], 0.9) == []


def test_tied_scores_are_visited_in_the_official_order():
    scores = [0.8, 0.95, 0.8, 0.8, 0.5]
    raw = {"car": [det(10 * i, 0, 10 * i + 5, 5, s) for i, s in enumerate(scores)]}
    kept = select_detections(raw, "colors")["car"]
    expected = _official_order(scores, 0.3)
    stable = sorted(range(len(scores)), key=lambda i: -scores[i])  # [1, 0, 2, 3, 4]
    assert expected != stable  # the ties 0, 2, 3 are visited in numpy's order, not the given one
    assert [int(d.box[0]) // 10 for d in kept] == expected
    # The order decides verdicts: "a red car" with two equally confident cars, red first.
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    cars = {"car": [det(0, 0, 10, 10, 0.9, color="red"), det(20, 0, 30, 10, 0.9, color="blue")]}
    assert evaluate(meta, select_detections(cars, "colors")).correct is False  # official: the blue one is "top"
    cars = {"car": [det(0, 0, 10, 10, 0.9, color="blue"), det(20, 0, 30, 10, 0.9, color="red")]}
    assert evaluate(meta, select_detections(cars, "colors")).correct is True
