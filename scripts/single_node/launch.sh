#!/usr/bin/env bash
# The one single-node training launch (accelerate, one process per GPU) that mopd.sh, sopd.sh,
# nft.sh, grpo.sh and cascade.sh share; they only choose the config. Direct use:
#   NUM_GPUS=8 bash scripts/single_node/launch.sh --config config/nft.py:geneval [key=value ...]
# Environment: NUM_GPUS (8), MAIN_PORT (29501), PYTHON (python). Nothing here is machine-specific.
set -euo pipefail
cd "$(dirname "$0")/../.."
NUM_GPUS=${NUM_GPUS:-8}
MAIN_PORT=${MAIN_PORT:-29501}
PYTHON=${PYTHON:-python}
# Check the config in ONE process first (no weights load): a user error then ends as one line,
# before accelerate starts N processes and adds its own failure report with a traceback.
# The check also names the accelerate config of the run's distributed.strategy (ddp: multi_gpu.yaml,
# fsdp: fsdp2.yaml); a cascade is not checked here, so its strategy comes from the command line.
ACCELERATE_CONFIG=scripts/accelerate_configs/multi_gpu.yaml
if [[ " $* " != *" --cascade "* ]]; then
  CHECKED=$(WORLD_SIZE="$NUM_GPUS" "$PYTHON" scripts/train.py expect_world_size="$NUM_GPUS" "$@" --validate_only)
  ACCELERATE_CONFIG=$(printf '%s\n' "$CHECKED" | sed -n 's/^accelerate_config: //p')
  printf '%s\n' "$CHECKED" | grep '^\[budget\]' || true  # the per-GPU memory of a round (ddp and fsdp)
elif [[ " $* " == *" distributed.strategy=fsdp "* ]]; then
  ACCELERATE_CONFIG=scripts/accelerate_configs/fsdp2.yaml
fi
exec accelerate launch --config_file "$ACCELERATE_CONFIG" \
  --num_processes "$NUM_GPUS" --main_process_port "$MAIN_PORT" \
  scripts/train.py expect_world_size="$NUM_GPUS" "$@"
