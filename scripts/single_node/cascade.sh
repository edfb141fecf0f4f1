#!/usr/bin/env bash
# Cascade NFT on one node: config/nft.py CASCADES (GenEval -> OCR -> PickScore), each stage
# starting from the previous stage's student; rerunning continues a killed cascade.
#   NUM_GPUS=8 bash scripts/single_node/cascade.sh output_dir=outputs/cascade_nft [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/../.."
CASCADE=${CASCADE:-config/nft.py:cascade}
NUM_GPUS=${NUM_GPUS:-8}
MAIN_PORT=${MAIN_PORT:-29501}
exec accelerate launch --config_file scripts/accelerate_configs/multi_gpu.yaml \
  --num_processes "$NUM_GPUS" --main_process_port "$MAIN_PORT" \
  scripts/train.py --cascade "$CASCADE" expect_world_size="$NUM_GPUS" "$@"
