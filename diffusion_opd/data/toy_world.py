"""The demo's toy world: 8x8 RGB pictures of coloured shapes and letters, three tasks on it.

Why this world (the report repeats it):

* **One model can satisfy all three tasks.** Each task has its own prompts, and the words that
  tell them apart ("says", "masterpiece", a colour name) are all in the prompt, so a prompt-
  conditioned model can be the best model for each task at once.
* **Joint RL interferes.** The tasks share words and the student's LoRA: the aesthetic task
  wants warm gold objects on clean backgrounds for "a square, masterpiece", the colour task
  wants "a blue square" blue. An update made for one task's prompts leaks into the other's
  through the shared "square" embedding and the shared adapter; multi-task RL mixes three
  reward signals in every step, and cascade RL forgets the earlier tasks.
* **The base is mediocre at all three**, like SD3.5-M before RL: its pretraining captions name
  the wrong colour half of the time (weak attribute binding), its letters are shifted by a
  pixel (bad text rendering) and its backgrounds are noisy (low aesthetics).

Pixels live in [-1, 1]; the rewards (rewards/toy.py) read the decoded images in [0, 1].
"""
from __future__ import annotations

import torch

IMAGE_SIZE = 8

PALETTE = {
    "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0), "magenta": (1.0, 0.0, 1.0), "white": (1.0, 1.0, 1.0),
}
GOLD = (1.0, 0.75, 0.0)  # the aesthetic task's favourite colour (not in the palette)


def _mask(rows: str) -> torch.Tensor:
    grid = [r for r in rows.split() if r]
    assert len(grid) == IMAGE_SIZE and all(len(r) == IMAGE_SIZE for r in grid), rows
    return torch.tensor([[c == "#" for c in r] for r in grid], dtype=torch.float32)


SHAPES = {
    "square": _mask("........ ........ ..####.. ..####.. ..####.. ..####.. ........ ........"),
    "plus": _mask("........ ...##... ...##... .######. .######. ...##... ...##... ........"),
    "ring": _mask("........ .######. .#....#. .#....#. .#....#. .#....#. .######. ........"),
    "bar": _mask("........ ........ ........ .######. .######. ........ ........ ........"),
    "diamond": _mask("........ ...##... ..####.. .######. .######. ..####.. ...##... ........"),
}
GLYPHS = {
    "T": _mask("........ .######. ...##... ...##... ...##... ...##... ...##... ........"),
    "L": _mask("........ .##..... .##..... .##..... .##..... .##..... .######. ........"),
    "H": _mask("........ .##..##. .##..##. .######. .##..##. .##..##. .##..##. ........"),
    "X": _mask("........ .##..##. ..####.. ...##... ...##... ..####.. .##..##. ........"),
    "E": _mask("........ .######. .##..... .#####.. .##..... .##..... .######. ........"),
    "U": _mask("........ .##..##. .##..##. .##..##. .##..##. .##..##. ..####.. ........"),
}
SIGN_TEMPLATES = ('a sign that says "{}"', 'a poster that says "{}"', 'a label that says "{}"')
STYLES = ("masterpiece", "high quality", "award winning")

# Task -> (reward name in the reward registry, prompts). Every prompt of a task is scored by
# that task's reward only (as in the paper's multi-task baselines).
TASKS = {
    "colour": ("toy_colour", [f"a {c} {s}" for s in SHAPES for c in PALETTE]),
    "glyph": ("toy_glyph", [t.format(g) for t in SIGN_TEMPLATES for g in GLYPHS]),
    "aesthetic": ("toy_aesthetic", [f"a {s}, {st}" for st in STYLES for s in SHAPES]),
}


def vocabulary() -> list[str]:
    """Every word the toy text encoder knows (prompts are bags of these words)."""
    words = {w for _, prompts in TASKS.values() for p in prompts for w in tokenize(p)}
    return sorted(words)


def tokenize(prompt: str) -> list[str]:
    """Lower-case words; a quoted letter becomes its own token ``"t"`` (not the word "t")."""
    out = []
    for i, part in enumerate(prompt.split('"')):
        if i % 2:  # inside quotes
            out.append(f'"{part.lower()}"')
        else:
            out += [w for w in part.lower().replace(",", " ").split() if w]
    return out


def _shift(mask: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    out = torch.zeros_like(mask)
    h, w = mask.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = mask[max(-dy, 0):h - max(dy, 0),
                                                                     max(-dx, 0):w - max(dx, 0)]
    return out


def sample_base_data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    """``n`` pretraining pairs (images in [-1, 1] of shape (n, 3, 8, 8), captions).

    Half coloured shapes, half letters. Captions name the true colour only half of the time
    (the other half a random colour; a fifth of them no colour), letters are shifted by up to a
    pixel, backgrounds carry noise of a random level, 20% of shape captions get a random style
    word, 10% of captions are empty (classifier-free guidance).
    """
    colours, shapes, glyphs = list(PALETTE), list(SHAPES), list(GLYPHS)
    shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    shifted = torch.stack([torch.stack([_shift(GLYPHS[g], dy, dx) for dy, dx in shifts]) for g in glyphs])
    shape_masks = torch.stack([SHAPES[s] for s in shapes])
    palette = torch.tensor([PALETTE[c] for c in colours])

    def draw(k: int) -> torch.Tensor:
        return torch.randint(k, (n,), generator=generator)

    u = torch.rand(n, 6, generator=generator)
    colour, named, shape, glyph, shift = draw(len(colours)), draw(len(colours)), draw(len(shapes)), \
        draw(len(glyphs)), draw(len(shifts))
    style, template = draw(len(STYLES)), draw(len(SIGN_TEMPLATES))
    is_shape = u[:, 1] < 0.5
    mask = torch.where(is_shape[:, None, None], shape_masks[shape], shifted[glyph, shift])[:, None]
    rgb = (palette[colour] * (0.7 + 0.3 * u[:, :1]))[:, :, None, None]
    noise = (0.3 * u[:, 5, None, None, None] * torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator).abs())
    images = mask * rgb + (1 - mask) * noise.clamp(0, 1)
    empty = torch.rand(n, generator=generator) < 0.1
    captions = []
    for i in range(n):
        if empty[i]:
            captions.append("")
        elif is_shape[i]:
            name = colours[colour[i]] if u[i, 2] < 0.5 else colours[named[i]]
            caption = f"a {shapes[shape[i]]}" if u[i, 3] < 0.2 else f"a {name} {shapes[shape[i]]}"
            captions.append(caption + (f", {STYLES[style[i]]}" if u[i, 4] < 0.2 else ""))
        else:
            captions.append(SIGN_TEMPLATES[template[i]].format(glyphs[glyph[i]]))
    return images * 2 - 1, captions
