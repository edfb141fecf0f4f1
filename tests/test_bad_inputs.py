"""Bad inputs a new user types, each answered by ONE line on stderr, exit code 2, no traceback,
and nothing written (issue 24, finding 11 and the CLI side of finding 5). The entry points run
in this process through their own ``main`` (what ``python scripts/...`` runs), before any model
loads; the disk-full and read-only cases need a real small file system (a tmpfs mounted in a
private user namespace) and are skipped where the kernel does not allow one."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from diffusion_opd.errors import UserError, one_line
from diffusion_opd.evaluation.run import main as eval_main
from diffusion_opd.rewards import load_reward
from tests.shared_data import shared_datasets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from train import main as train_main  # noqa: E402

OPD = os.path.join(ROOT, "config", "opd.py")
NFT = os.path.join(ROOT, "config", "nft.py")


def tree(folder) -> dict:
    """{relative path: (size, mtime) of a file, None for a folder} of everything under ``folder``."""
    out = {}
    for base, dirs, files in os.walk(folder):
        for name in dirs:
            out[os.path.relpath(os.path.join(base, name), folder)] = None
        for name in files:
            st = os.lstat(os.path.join(base, name))
            out[os.path.relpath(os.path.join(base, name), folder)] = (st.st_size, st.st_mtime_ns)
    return out


# (id, entry point, argv with {tmp} / {file} / {data}, what the one line must say)
TABLE = [
    ("unknown config name", "train", ["--config", f"{OPD}:tiny_mpod", "output_dir={tmp}/run"],
     "unknown config 'tiny_mpod'"),
    ("output_dir is a file", "train", ["--config", f"{OPD}:tiny_mopd", "output_dir={file}"], "is a file, not a folder"),
    ("output_dir below a file", "train", ["--config", f"{OPD}:tiny_mopd", "output_dir={file}/run"],
     "which is a file"),
    ("output_dir under /proc", "train", ["--config", f"{OPD}:tiny_mopd", "output_dir=/proc/diffusion_opd_probe/run"],
     "output_dir: cannot create files in /proc"),
    ("reward named twice", "train", ["--config", f"{NFT}:tiny", "output_dir={tmp}/run",
                                     "tasks.bright.reward=brightness:1.0,brightness:2.0"], "'brightness' appears twice"),
    ("NaN reward weight", "train", ["--config", f"{NFT}:tiny", "output_dir={tmp}/run", "tasks.bright.reward=brightness:nan"],
     "must be a finite number"),
    ("eval output_dir is a file", "eval", ["--output_dir", "{file}"], "--output_dir: {file} is a file"),
    ("eval reward option of the wrong kind", "eval", ["--output_dir", "{tmp}/eval", "--reward_option",
                                                      "ocr.min_confidence=abc"], "option 'min_confidence' expects a float"),
    ("eval guidance inf", "eval", ["--output_dir", "{tmp}/eval", "--guidance_scale", "inf"],
     "--guidance_scale must be a finite number in [0, 100]"),
    ("eval guidance 1e30", "eval", ["--output_dir", "{tmp}/eval", "--guidance_scale", "1e30"],
     "--guidance_scale must be a finite number in [0, 100]"),
    ("eval unknown reward option", "eval", ["--output_dir", "{tmp}/eval", "--reward_option", "ocr.bogus_option=1"],
     "reward 'ocr' has no option 'bogus_option'"),
    # video (Wan): refused before the tiny pipeline is built
    ("video: a reward that cannot score frames", "train", ["--config", f"{OPD}:tiny_wan_t2v_mopd", "output_dir={tmp}/run",
                                                          "tasks.objects.reward=toy_colour"],
     "tasks.objects.reward: reward 'toy_colour' scores only images of its own kind and cannot score video frames; use "
     "an image reward that reads natural images (e.g. brightness, ocr, pickscore)"),
    ("video: a frame count the VAE cannot encode", "train", ["--config", f"{NFT}:tiny_wan_t2v", "output_dir={tmp}/run",
                                                            "sample.num_frames=6"],
     "sample.num_frames: 6 frames cannot be encoded by the video VAE (it keeps the first frame and compresses the "
     "rest 4x): use 1 + a multiple of 4, e.g. 5"),
    ("video: an unknown frame key", "train", ["--config", f"{OPD}:tiny_wan_t2v_mopd", "output_dir={tmp}/run",
                                             "sample.reward_frames=some"],
     "sample.reward_frames: unknown frame key 'some'; valid: all, first, middle, last, count:<k>, stride:<k>"),
    ("eval: a frame count the VAE cannot encode", "eval", ["--output_dir", "{tmp}/eval", "--num_frames", "6"],
     "--num_frames: 6 frames cannot be encoded by the video VAE"),
    ("eval: a video reward that cannot score frames", "eval", ["--output_dir", "{tmp}/eval", "--num_frames", "5",
                                                              "--rewards", "brightness,toy_colour"],
     "reward 'toy_colour' scores only images of its own kind and cannot score video frames"),
    # distributed.text_encoders: refused before anything loads
    ("text encoders sharded under ddp", "train", ["--config", f"{OPD}:tiny_mopd", "output_dir={tmp}/run",
                                                  "distributed.text_encoders=shard"],
     "distributed.text_encoders: shard needs distributed.strategy=fsdp"),
    ("sharded text encoders offloaded", "train", ["--config", f"{OPD}:tiny_mopd", "output_dir={tmp}/run",
                                                  "distributed.strategy=fsdp", "distributed.text_encoders=shard",
                                                  "model.offload_text_encoders=true"],
     "model.offload_text_encoders: true with distributed.text_encoders=shard is not supported"),
    ("unknown text-encoder placement", "train", ["--config", f"{OPD}:tiny_mopd", "output_dir={tmp}/run",
                                                 "distributed.text_encoders=rank1"], "distributed.text_encoders"),
]
if not torch.cuda.is_available():  # refused, not silently run on the CPU
    TABLE.append(("device=cuda without a GPU", "train", ["--config", f"{OPD}:tiny_mopd", "output_dir={tmp}/run",
                                                          "device=cuda"], "device: 'cuda', but torch sees no CUDA GPU"))


@pytest.mark.parametrize("entry,argv,message", [t[1:] for t in TABLE], ids=[t[0] for t in TABLE])
def test_bad_input_is_one_line_exit_2_nothing_written(entry, argv, message, tmp_path, capsys, tiny_sd3_dir):
    afile = tmp_path / "afile"
    afile.write_text("the user's own file\n")
    fill = {"{tmp}": str(tmp_path), "{file}": str(afile)}
    for key, value in fill.items():
        argv = [a.replace(key, value) for a in argv]
        message = message.replace(key, value)
    if entry == "eval":
        argv = ["--dataset", "ocr", "--data_root", str(shared_datasets()), "--model", tiny_sd3_dir,
                "--max_samples", "1", *argv]
    before = tree(tmp_path)
    capsys.readouterr()
    code = (train_main if entry == "train" else eval_main)(argv)
    out, err = capsys.readouterr()
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in out + err
    assert tree(tmp_path) == before  # nothing created, nothing changed
    assert afile.read_text() == "the user's own file\n"


def test_load_reward_with_a_bogus_option_is_one_user_error():
    with pytest.raises(UserError) as err:
        load_reward("ocr", bogus_option=1)
    assert one_line(err.value) == str(err.value)
    assert "reward 'ocr' has no option 'bogus_option'; its options: device, batch_size" in str(err.value)
    with pytest.raises(TypeError):  # still a TypeError for callers that caught one
        load_reward("ocr", min_confidence="abc")


def test_resume_latest_says_what_it_does(tmp_path, capsys):
    """Into an empty folder: says it starts fresh. With fewer rounds than the run reached: one
    line, exit 2, nothing written (it would have trained nothing, silently)."""
    out = tmp_path / "run"
    args = ["--config", f"{OPD}:tiny_mopd", f"output_dir={out}", "logging.progress=false", "eval.every=0",
            "train.num_rounds=2", "resume_from=latest"]
    assert train_main(args) == 0
    printed = capsys.readouterr().out
    assert "resume_from=latest: no checkpoint under" in printed and "starting a new run" in printed
    before = tree(tmp_path)
    assert train_main([*args, "train.num_rounds=1"]) == 2
    _, err = capsys.readouterr()
    assert err.strip().splitlines() == [err.strip()] and "train.num_rounds: 1, but" in err
    assert "round-2" in err and "nothing would train" in err and "Traceback" not in err
    assert {k: v for k, v in tree(tmp_path).items() if not k.endswith("run.lock")} == \
        {k: v for k, v in before.items() if not k.endswith("run.lock")}


def _in_small_filesystem(script: str, tmp_path, options: str) -> str:
    """Run the shell ``script`` with $MNT a fresh tmpfs (``options``) in a private mount
    namespace; skip where unprivileged namespaces are not allowed."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o {options} tmpfs {mnt}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {probe.stderr.strip()}")
    env = {**os.environ, "MNT": str(mnt), "PY": sys.executable, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o {options} tmpfs $MNT && {script}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc.stdout


def test_full_disk_is_one_line_also_on_a_rerun(tmp_path):
    err = tmp_path / "stderr"
    run = ('$PY scripts/train.py --config config/nft.py:tiny output_dir=$MNT/run logging.progress=false '
           f'train.num_rounds=1 >/dev/null 2>{err}; echo "rc=$?"; echo "lines=$(grep -c . {err})"; tail -n 1 {err}')
    # 256 kB: the lock and the config fit, the tiny pipeline the run builds does not
    out = _in_small_filesystem(f"{run}; {run}", tmp_path, "size=256k").strip().splitlines()
    assert len(out) == 6, out
    for rc, lines, line in (out[:3], out[3:]):  # the run, then a rerun while the disk is still full
        assert rc == "rc=2" and lines == "lines=1", out
        assert line.startswith("error: ENOSPC (No space left on device)") and "resume_from=latest" in line, out


def test_read_only_output_dir_is_one_line_and_writes_nothing(tmp_path):
    run = ('$PY scripts/train.py --config config/nft.py:tiny output_dir=$MNT/run 2>&1; echo "rc=$?"; ls -A $MNT')
    out = _in_small_filesystem(run, tmp_path, "ro,size=64k").strip().splitlines()
    assert out[0].startswith("error: output_dir: cannot create files in") and "Read-only file system" in out[0], out
    assert out[1:] == ["rc=2"], out  # one line, and the read-only folder is as empty as before
