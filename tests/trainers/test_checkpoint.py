"""Checkpoint folders: atomic publish, last-K pruning, only complete checkpoints are resumable."""
import os

import pytest

from diffusion_opd.trainers import checkpoint as ckpt


def _write(output_dir, round_idx):
    tmp = ckpt.temporary_dir(output_dir, round_idx)
    os.makedirs(tmp)
    ckpt.write_json(os.path.join(tmp, "trainer_state.json"), {"round": round_idx})
    return tmp


def test_publish_keeps_last_k_and_ignores_incomplete(tmp_path):
    out = str(tmp_path)
    for r in (1, 2, 3, 4):
        _write(out, r)
        ckpt.publish(out, r, keep_last=2)
    assert [r for r, _ in ckpt.list_checkpoints(out)] == [3, 4]
    # a crash mid-write leaves only a hidden temporary folder: never picked up
    os.makedirs(ckpt.temporary_dir(out, 5))
    # a folder with the right name but no trainer_state.json is not complete either
    os.makedirs(os.path.join(ckpt.checkpoint_root(out), "round-6"))
    assert ckpt.resolve_resume("latest", out).endswith("round-4")
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint"):
        ckpt.resolve_resume(os.path.join(ckpt.checkpoint_root(out), "round-6"), out)


def test_resume_latest_without_checkpoints_starts_fresh(tmp_path):
    assert ckpt.resolve_resume("latest", str(tmp_path)) is None
    assert ckpt.resolve_resume("", str(tmp_path)) is None


def test_rng_state_roundtrip(tmp_path):
    import random

    import numpy as np
    import torch

    ckpt.save_rank_rng(str(tmp_path), rank=3)
    expected = (random.random(), float(np.random.rand()), torch.rand(1).item())
    assert ckpt.load_rank_rng(str(tmp_path), rank=3)
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == expected
    assert not ckpt.load_rank_rng(str(tmp_path), rank=4)
