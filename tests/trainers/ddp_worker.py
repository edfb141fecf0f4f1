"""Run by tests/trainers/test_distributed.py and test_sharding.py under `torchrun --nproc_per_node 2` (real gloo DDP).

Trains $DDP_CONFIG (default tiny_mopd), then every rank writes its student weights and the prompt indices it drew.
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from safetensors.torch import save_file  # noqa: E402

from diffusion_opd.config import load_config  # noqa: E402
from diffusion_opd.trainers.recipes import train  # noqa: E402
from diffusion_opd.trainers.sharding import gather  # noqa: E402

out = sys.argv[1]
spec = os.environ.get("DDP_CONFIG", "config/opd.py:tiny_mopd")  # any recipe's config
config = load_config(os.path.join(ROOT, spec), [f"output_dir={out}"] + sys.argv[2:])
run = train(config)
rank = run.accelerator.process_index
save_file({k: v.contiguous() for k, v in gather(run.policy.student_state_dict()).items()},  # full under fsdp
          os.path.join(out, f"student_rank{rank}.safetensors"))
with open(os.path.join(out, f"seen_rank{rank}.json"), "w") as f:
    json.dump({"world_size": run.accelerator.num_processes, "seen": run.seen_prompts}, f)
