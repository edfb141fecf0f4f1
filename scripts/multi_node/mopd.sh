#!/usr/bin/env bash
# Multi-node OPD. Run the same command on every node; the scheduler (or you) sets:
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (default 29501), GPUS_PER_NODE (default 8)
#   CONFIG (default config/opd.py:mopd); extra arguments are config overrides.
# output_dir must be on a filesystem every node sees (checkpoints are written by rank 0 and
# read by all ranks on resume).
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
MASTER_PORT=${MASTER_PORT:-29501}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CONFIG=${CONFIG:-config/opd.py:mopd}
WORLD=$((NNODES * GPUS_PER_NODE))
# Check the config in one process first: a user error ends as one line on every node, before
# accelerate starts its processes (whose failure report would add a traceback).
WORLD_SIZE="$WORLD" "${PYTHON:-python}" scripts/train.py --config "$CONFIG" expect_world_size="$WORLD" "$@" --validate_only >/dev/null
exec accelerate launch --config_file scripts/accelerate_configs/multi_gpu.yaml \
  --num_machines "$NNODES" --machine_rank "$NODE_RANK" --num_processes "$WORLD" \
  --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
  scripts/train.py --config "$CONFIG" expect_world_size="$WORLD" "$@"
