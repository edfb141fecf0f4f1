"""The built-in text-to-video prompt set ``video_motion``: no download, selected like any prompt
set (``tasks.<task>.prompts="video_motion"``, ``scripts/evaluation.py --dataset video_motion``).

Each prompt names a subject and what moves: a body (running, turning, falling), a fluid
(pouring, splashing, waves), the camera (pan, dolly, orbit) or light (flicker, sunrise), so a
video model's frames have to change in a particular way, which an image prompt never asks for.
Written for this project. No test prompt is in the train split, so a held-out reward or distance
is measured on prompts the student was not trained on.

Your own video prompts use the image sets' file formats (:mod:`diffusion_opd.data.prompts`):
``.txt``, one prompt per line, or ``.jsonl``, one object per line with a ``"prompt"`` and any
fields a reward reads (GenEval's ``tag`` / ``include`` / ``exclude``...): an image reward scores
a video frame by frame with its prompt's row, so those fields apply to every scored frame.
"""
from __future__ import annotations

VIDEO_MOTION_TRAIN = (
    "a red fox running through fresh snow, snow spraying behind its paws",
    "a golden retriever shaking water off its fur after a swim, droplets flying",
    "a hummingbird hovering at a flower, its wings a blur",
    "a horse galloping along a beach at sunset, waves washing over its hooves",
    "a cat leaping from a windowsill onto a sofa",
    "a flock of starlings turning together in the evening sky",
    "a skateboarder kicking off and rolling down an empty street",
    "a ballet dancer spinning on one foot, her skirt flaring out",
    "a chef flipping a pancake high out of a pan",
    "a child blowing out candles on a birthday cake, the flames bending",
    "a runner crossing a finish line and raising both arms",
    "a juggler tossing three orange balls in the air",
    "coffee being poured into a white cup, steam rising",
    "a wave curling and crashing onto black volcanic rocks",
    "a waterfall pouring into a pool, mist drifting across the frame",
    "rain drops hitting a puddle, ripples spreading outward",
    "a glass of milk tipping over and spilling across a wooden table",
    "honey slowly dripping from a wooden dipper",
    "a campfire crackling at night, sparks rising into the dark",
    "smoke curling upward from a snuffed candle",
    "autumn leaves swirling in the wind across a park path",
    "clouds racing over a mountain ridge in a time-lapse",
    "a sunflower field swaying in a strong breeze",
    "a paper boat drifting down a rain gutter stream",
    "the camera slowly panning left across a city skyline at dusk",
    "the camera dollying forward through a narrow alley of lanterns",
    "the camera orbiting a vintage car parked in a desert",
    "a drone shot rising over a forest to reveal a lake",
    "neon signs flickering on a rainy street at night",
    "the sun rising over the sea, the light spreading across the water",
    "a lighthouse beam sweeping through thick fog",
    "a windmill's blades turning slowly on a green hill",
)

VIDEO_MOTION_TEST = (
    "a kangaroo hopping across a dusty plain",
    "a surfer carving down the face of a large wave",
    "a spinning top wobbling and finally falling over on a table",
    "a butterfly opening and closing its wings on a leaf",
    "ink dropping into a glass of water and blooming outward",
    "a steam train pulling out of a station, smoke billowing",
    "the camera tracking a cyclist along a coastal road",
    "snow falling on a quiet village street lit by lamps",
)

VIDEO_PROMPT_SETS: dict[str, dict[str, tuple[str, ...]]] = {
    "video_motion": {"train": VIDEO_MOTION_TRAIN, "test": VIDEO_MOTION_TEST},
}
