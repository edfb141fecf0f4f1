#!/usr/bin/env bash
# Stage 1 on one node: DiffusionNFT (config/nft.py).
#   NAME=geneval NUM_GPUS=8 bash scripts/single_node/nft.sh [key=value ...]
#   NAME=multitask bash scripts/single_node/nft.sh output_dir=outputs/x
# Extra arguments are config overrides (key=value). Nothing here is machine-specific.
set -euo pipefail
cd "$(dirname "$0")/../.."
NAME=${NAME:-geneval}
NUM_GPUS=${NUM_GPUS:-8}
MAIN_PORT=${MAIN_PORT:-29501}
exec accelerate launch --config_file scripts/accelerate_configs/multi_gpu.yaml \
  --num_processes "$NUM_GPUS" --main_process_port "$MAIN_PORT" \
  scripts/train.py --config "config/nft.py:${NAME}" expect_world_size="$NUM_GPUS" "$@"
