"""Two real processes (torchrun, gloo): the run completes, replicas stay identical, prompts are disjoint."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from diffusion_opd.trainers.metrics import read_metrics

from tests.processes import ROOT
from tests.processes import free_port as _free_port


@pytest.mark.parametrize("spec", ["config/opd.py:tiny_mopd",
                                  pytest.param("config/nft.py:tiny", marks=pytest.mark.slow),
                                  pytest.param("config/grpo.py:tiny_guard", marks=pytest.mark.slow)])
def test_two_process_ddp(tmp_path, spec):
    """OPD, and (slow) the stage-1 recipes, whose advantages gather every process's rewards."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    out = str(tmp_path / "ddp")
    cmd = [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "tests/trainers/ddp_worker.py", out, "train.num_rounds=3", "eval.every=3", "expect_world_size=2",
           "logging.progress=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DDP_CONFIG": spec}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = (load_file(os.path.join(out, f"student_rank{r}.safetensors")) for r in (0, 1))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), "replicas diverged"
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k), "the student did not train"
    seen = [json.load(open(os.path.join(out, f"seen_rank{r}.json"))) for r in (0, 1)]
    assert [s["world_size"] for s in seen] == [2, 2]
    for (r0, t0, i0), (r1, t1, i1) in zip(seen[0]["seen"], seen[1]["seen"]):
        assert (r0, t0) == (r1, t1)
        assert not set(i0) & set(i1), f"round {r0} task {t0}: ranks drew the same prompts"
    rows = read_metrics(out)
    assert [r["round"] for r in rows if "loss" in r] == [1, 2, 3]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_launch_script_runs_two_processes_with_accelerate(tmp_path, strategy):
    """The shipped scripts/single_node/mopd.sh (accelerate launch + multi_gpu.yaml, or fsdp2.yaml
    picked from distributed.strategy=fsdp), 2 CPU processes."""
    out = str(tmp_path / "acc")
    env = {**os.environ, "NUM_GPUS": "2", "MAIN_PORT": str(_free_port()), "OMP_NUM_THREADS": "1",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    result = subprocess.run(["bash", "scripts/single_node/mopd.sh", "--config", "config/opd.py:tiny_mopd",
                             f"output_dir={out}", "train.num_rounds=2", "eval.every=0", "logging.progress=false",
                             f"distributed.strategy={strategy}"],
                            cwd=ROOT, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[opd] world_size: 2" in result.stdout + result.stderr
    assert ("[fsdp] sharded over 2 processes" in result.stdout + result.stderr) == (strategy == "fsdp")
    assert [r["round"] for r in read_metrics(out)] == [1, 2]


@pytest.mark.parametrize("script", ["mopd.sh", "sopd.sh", "nft.sh", "grpo.sh"])
def test_launch_scripts_print_a_user_error_as_one_line_before_launching(script):
    """A bad key through any single-node launch script: one line, exit 2, and accelerate never
    starts (its failure report would add a traceback)."""
    env = {**os.environ, "NUM_GPUS": "2", "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    result = subprocess.run(["bash", f"scripts/single_node/{script}", "lora.rank=-4"], cwd=ROOT,
                            capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: lora.rank: must be > 0, got -4"], result.stderr[-2000:]
    assert "Traceback" not in result.stdout + result.stderr
