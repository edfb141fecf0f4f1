"""Videos as lists of frames (PIL images), what a video policy's ``decode`` returns: which frames
an image reward scores, a frame strip for sample grids, and mp4 files.

A video model (Wan) decodes each sample to a list of frames; everything that handles images
accepts such a list where it accepts an image: image rewards score sub-sampled frames and
average them (:func:`frame_indices`, ``rewards.video``), grids show a strip of frames
(:func:`frame_strip`), the evaluation CLI also writes an mp4 (:func:`write_mp4`, through PyAV, the
optional extra ``video``).
"""
from __future__ import annotations

import itertools
from typing import Iterable, Sequence

__all__ = ["is_video", "frame_indices", "frame_strip", "write_mp4", "FRAME_KEYS"]

# How the frames an image reward scores are chosen (``reward.frames`` / the ``@frames`` suffix).
FRAME_KEYS = ("all", "first", "middle", "last", "count:<k>", "stride:<k>")


def is_video(sample) -> bool:
    """A decoded video (a list / tuple of frames) rather than one image."""
    return isinstance(sample, (list, tuple))


def frame_indices(num_frames: int, key: str = "all") -> list[int]:
    """The frames of a ``num_frames`` video that ``key`` selects: "all", "first", "middle",
    "last", "count:k" (k frames evenly spaced, first and last included) or "stride:k" (every
    k-th frame from the first)."""
    if num_frames < 1:
        raise ValueError(f"a video needs at least one frame, got {num_frames}")
    kind, _, arg = str(key).partition(":")
    fixed = {"all": list(range(num_frames)), "first": [0], "middle": [num_frames // 2], "last": [num_frames - 1]}
    if kind in fixed and not arg:
        return fixed[kind]
    if kind in ("count", "stride") and arg.isdigit() and int(arg) >= 1:
        k = int(arg)
        if kind == "stride":
            return list(range(0, num_frames, k))
        k = min(k, num_frames)
        if k == 1:
            return [0]
        return sorted({round(i * (num_frames - 1) / (k - 1)) for i in range(k)})
    raise ValueError(f"unknown frame key {key!r}; valid: {', '.join(FRAME_KEYS)}")


def frame_strip(frames: Sequence, max_frames: int = 8):
    """Up to ``max_frames`` evenly spaced frames side by side, one PIL image (sample grids, the
    evaluation's frame grid)."""
    from PIL import Image

    chosen = [frames[i] for i in frame_indices(len(frames), f"count:{max_frames}")]
    w, h = chosen[0].size
    strip = Image.new("RGB", (w * len(chosen), h), "white")
    for i, frame in enumerate(chosen):
        strip.paste(frame.convert("RGB"), (i * w, 0))
    return strip


def write_mp4(frames: Iterable, path: str, fps: int = 16) -> str:
    """Write ``frames`` (PIL images of one size; a list or a generator, read once) as an H.264
    mp4 (yuv420p, so any player opens it) through PyAV, whose wheel ships ffmpeg:
    ``pip install 'diffusion-opd[video]'``."""
    try:
        import av
    except ImportError as err:
        from .errors import UserError

        raise UserError("writing mp4 needs PyAV: pip install 'diffusion-opd[video]' (or pip install av)") from err
    import numpy as np

    frames = iter(frames)
    first = next(frames)
    w, h = first.size
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        stream.width, stream.height = w - w % 2, h - h % 2  # yuv420p needs even sides
        stream.pix_fmt = "yuv420p"
        for frame in itertools.chain([first], frames):
            rgb = np.asarray(frame.convert("RGB"))[: stream.height, : stream.width]
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")))
        container.mux(stream.encode())
    return path
