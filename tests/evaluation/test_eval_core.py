"""The one evaluation core: the trainer's periodic ``eval/reward/<task>`` and
``scripts/evaluation.py``'s mean for the same checkpoint, prompts and seed are the same number."""
import json
import os

from diffusion_opd.config import load_config
from diffusion_opd.evaluation.core import eval_seed
from diffusion_opd.evaluation.run import main as evaluation_main
from diffusion_opd.trainers.checkpoint import round_dir
from diffusion_opd.trainers.metrics import read_metrics
from diffusion_opd.trainers.recipes import train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_trainer_eval_reward_equals_the_cli_mean_exactly(tmp_path):
    out = tmp_path / "run"
    config = load_config(os.path.join(ROOT, "config", "opd.py") + ":tiny_mopd", [
        f"output_dir={out}", "train.num_rounds=1", "save_every=1", "eval.every=1", "eval.rewards=true",
        "eval.sample_images=0", "logging.progress=false", "tasks.objects.reward=brightness", "seed=7"])
    train(config)
    rows = {r["round"]: r for r in read_metrics(str(out))}
    trainer = rows[1]["eval/reward/objects"]

    prompts = tmp_path / "objects.txt"  # the task's held-out prompts, in their order
    prompts.write_text("\n".join(config.tasks.objects.eval_prompts) + "\n")
    assert evaluation_main([
        "--dataset", str(prompts), "--checkpoint_path", round_dir(str(out), 1), "--rewards", "brightness",
        "--seed", "7", "--eval.num_steps", str(config.eval.num_steps),
        "--sample.guidance_scale", str(config.sample.guidance_scale),
        "--sample.resolution", str(config.sample.resolution),
        "--model.max_sequence_length", str(config.model.max_sequence_length),
        "--batch_size", str(config.eval.num_prompts), "--output_dir", str(tmp_path / "eval"), "--no_progress"]) == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    results = [json.loads(line) for line in (tmp_path / "eval" / "results.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in results] == [eval_seed(7, i) for i in range(len(results))]  # the one seed rule
    assert summary["metrics"]["brightness/mean"] == trainer  # exactly: the same images, the same mean
    assert rows[0]["eval/reward/objects"] != trainer  # the round's step changed the images it scores
