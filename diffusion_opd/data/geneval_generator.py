"""GenEval-style training prompts: metadata rows in the format of the official GenEval metadata.

Six tags, built from the 80 COCO classes, the ten GenEval colours and four relations. The
templates and field layout reproduce the official test metadata row for row (the tests
re-render every official row from its ``include``/``exclude`` clauses):

====================  ==================================================  ======================
tag                   prompt                                              clauses
====================  ==================================================  ======================
single_object         a photo of a {obj}                                  include obj x1
two_object            a photo of a {obj} and a {obj2}                     include obj, obj2 x1
counting              a photo of {two|three|four} {objs}                  include obj xn,
                                                                          exclude obj x(n+1)
colors                a photo of a {color} {obj}                          include obj x1 + color
position              a photo of a {obj2} {relation} a {obj}              include obj x1, obj2 x1
                                                                          + position [rel, 0]
color_attr            a photo of a {color} {obj} and a {color2} {obj2}    both with colours
====================  ==================================================  ======================

"a" becomes "an" before a vowel. Plurals follow the official metadata ("bus" -> "buses",
"wine glass" -> "wine glasses", otherwise "+s", e.g. "benchs", "sheeps"), except that the
already-plural class names "skis" and "scissors" stay unchanged. Two-object tags use two
different classes; color_attr uses two different colours.

CLI::

    python -m diffusion_opd.data.geneval_generator --n 5000 --seed 0 \\
        --out dataset/geneval/train_metadata.jsonl [--exclude-test] [--root dataset]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from ..errors import UserError, run_cli
from .coco import COCO_CLASSES, COLORS, RELATIONS, TAGS

COUNT_WORDS: dict[int, str] = {2: "two", 3: "three", 4: "four"}
_ALREADY_PLURAL = {"skis", "scissors"}


def with_article(phrase: str) -> str:
    """``"a {phrase}"``, or ``"an {phrase}"`` when it starts with a vowel letter."""
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def plural(name: str) -> str:
    """The plural GenEval's metadata uses: "+es" after a final "s", else "+s"."""
    if name in _ALREADY_PLURAL:
        return name
    return name + ("es" if name.endswith("s") else "s")


def render_prompt(tag: str, include: Sequence[dict]) -> str:
    """The prompt text of a row with this ``tag`` and ``include`` clauses."""
    if tag == "single_object":
        return f"a photo of {with_article(include[0]['class'])}"
    if tag == "two_object":
        return f"a photo of {with_article(include[0]['class'])} and {with_article(include[1]['class'])}"
    if tag == "counting":
        clause = include[0]
        return f"a photo of {COUNT_WORDS[clause['count']]} {plural(clause['class'])}"
    if tag == "colors":
        return f"a photo of {with_article(include[0]['color'] + ' ' + include[0]['class'])}"
    if tag == "position":
        anchor, placed = include
        return f"a photo of {with_article(placed['class'])} {placed['position'][0]} {with_article(anchor['class'])}"
    if tag == "color_attr":
        first, second = (with_article(c["color"] + " " + c["class"]) for c in include)
        return f"a photo of {first} and {second}"
    raise ValueError(f"unknown GenEval tag '{tag}'; valid tags: {', '.join(TAGS)}")


def make_row(tag: str, include: list[dict], exclude: Optional[list[dict]] = None) -> dict:
    """A metadata row with the official key order: tag, include, [exclude], prompt."""
    row: dict = {"tag": tag, "include": include}
    if exclude is not None:
        row["exclude"] = exclude
    row["prompt"] = render_prompt(tag, include)
    return row


def _sample_row(tag: str, rng: np.random.Generator) -> dict:
    """One uniformly random row of a large tag (two_object, position, color_attr)."""
    a, b = (COCO_CLASSES[i] for i in rng.choice(len(COCO_CLASSES), size=2, replace=False))
    if tag == "two_object":
        return make_row(tag, [{"class": a, "count": 1}, {"class": b, "count": 1}])
    if tag == "position":
        relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
        return make_row(tag, [{"class": a, "count": 1}, {"class": b, "count": 1, "position": [relation, 0]}])
    if tag == "color_attr":
        ca, cb = (COLORS[i] for i in rng.choice(len(COLORS), size=2, replace=False))
        return make_row(tag, [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}])
    raise ValueError(f"tag '{tag}' is not sampled by rejection")


def _enumerate_rows(tag: str) -> list[dict]:
    """Every row of a small tag (single_object, counting, colors), in a fixed order."""
    if tag == "single_object":
        return [make_row(tag, [{"class": o, "count": 1}]) for o in COCO_CLASSES]
    if tag == "counting":
        return [
            # exclude n+1, as the official rows do: "n" objects means not n+1 of them
            make_row(tag, [{"class": o, "count": n}], exclude=[{"class": o, "count": n + 1}])
            for o in COCO_CLASSES for n in sorted(COUNT_WORDS)
        ]
    if tag == "colors":
        return [make_row(tag, [{"class": o, "count": 1, "color": c}]) for o in COCO_CLASSES for c in COLORS]
    raise ValueError(f"tag '{tag}' is too large to enumerate")


_SMALL_TAGS = ("single_object", "counting", "colors")


def generate_geneval_metadata(
    n: int, seed: int = 0, tags: Sequence[str] = TAGS, exclude_prompts: Iterable[str] = ()
) -> list[dict]:
    """``n`` GenEval-style metadata rows, tags balanced (counts differ by at most one) and
    shuffled, deterministic in ``seed``; within a tag every allowed prompt is equally likely.

    Prompts in ``exclude_prompts`` (e.g. the test set) are never produced. Rows may repeat (a
    training set is sampled with replacement: single_object has only 80 prompts).
    """
    unknown = [t for t in tags if t not in TAGS]
    if unknown or not tags:
        raise ValueError(f"unknown GenEval tags {unknown or list(tags)!r}; valid tags: {', '.join(TAGS)}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    excluded = set(exclude_prompts)
    # Small tags are drawn from their enumerated allowed rows; the three large ones (>= 6320
    # prompts, at most 553 of them in the test set) by rejection, bounded in case an exclude
    # file covers nearly a whole tag.
    allowed = {t: [r for r in _enumerate_rows(t) if r["prompt"] not in excluded] for t in tags if t in _SMALL_TAGS}
    for tag, rows in allowed.items():
        if not rows:
            raise ValueError(
                f"tag '{tag}': all of its prompts are excluded (e.g. all 80 single_object prompts are "
                f"test prompts); drop it with --tags {' '.join(t for t in tags if t != tag)}"
            )
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x6E4E]))
    plan = [tags[i % len(tags)] for i in range(n)]
    rng.shuffle(plan)
    out = []
    for tag in plan:
        if tag in allowed:
            row = allowed[tag][int(rng.integers(len(allowed[tag])))]
            row = copy.deepcopy(row)  # independent copy: callers may edit rows
        else:
            for _ in range(100_000):
                row = _sample_row(tag, rng)
                if row["prompt"] not in excluded:
                    break
            else:
                raise ValueError(f"tag '{tag}': (nearly) all of its prompts are excluded")
        out.append(row)
    return out


def write_jsonl(rows: Sequence[dict], out: Path) -> None:
    """Write rows as JSON lines, atomically (temporary file then rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: write ``--n`` generated rows to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, required=True, help="number of rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="output .jsonl")
    parser.add_argument("--tags", nargs="+", default=list(TAGS), choices=TAGS)
    parser.add_argument("--exclude-test", action="store_true",
                        help="never produce a prompt of <root>/geneval/test_metadata.jsonl "
                             "(all 80 single_object prompts are test prompts: also pass --tags without it)")
    parser.add_argument("--exclude-file", type=Path, action="append", default=[],
                        help="never produce a prompt of this .txt/.jsonl file (repeatable)")
    parser.add_argument("--root", default="dataset", help="data root for --exclude-test")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)

    from .prompts import load_prompt_file, load_task_prompts

    if args.out.exists() and not args.overwrite:
        parser.error(f"{args.out} exists (it may be a downloaded official file); pass --overwrite to replace it")
    excluded: set[str] = set()
    try:
        if args.exclude_test:
            excluded |= set(load_task_prompts("geneval", "test", root=args.root).prompts)
        for path in args.exclude_file:
            excluded |= set(load_prompt_file(path).prompts)
        rows = generate_geneval_metadata(args.n, args.seed, args.tags, excluded)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from None
    write_jsonl(rows, args.out)
    counts = {t: sum(r["tag"] == t for r in rows) for t in args.tags}
    print(f"wrote {len(rows)} rows ({len({r['prompt'] for r in rows})} distinct prompts) to {args.out}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
