#!/usr/bin/env bash
# Stage 1 on one node: Flow-GRPO / GRPO-Guard (config/grpo.py).
#   NAME=ocr NUM_GPUS=8 bash scripts/single_node/grpo.sh [key=value ...]
#   NAME=multitask bash scripts/single_node/grpo.sh output_dir=outputs/x
# Extra arguments are config overrides (key=value). Nothing here is machine-specific.
set -euo pipefail
cd "$(dirname "$0")/../.."
NAME=${NAME:-ocr}
NUM_GPUS=${NUM_GPUS:-8}
MAIN_PORT=${MAIN_PORT:-29501}
exec accelerate launch --config_file scripts/accelerate_configs/multi_gpu.yaml \
  --num_processes "$NUM_GPUS" --main_process_port "$MAIN_PORT" \
  scripts/train.py --config "config/grpo.py:${NAME}" expect_world_size="$NUM_GPUS" "$@"
