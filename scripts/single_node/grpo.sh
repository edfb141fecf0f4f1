#!/usr/bin/env bash
# Stage 1 on one node: Flow-GRPO / GRPO-Guard (config/grpo.py; see launch.sh for NUM_GPUS / MAIN_PORT).
#   NAME=ocr NUM_GPUS=8 bash scripts/single_node/grpo.sh [key=value ...]
#   NAME=multitask bash scripts/single_node/grpo.sh output_dir=outputs/x
exec bash "$(dirname "$0")/launch.sh" --config "config/grpo.py:${NAME:-ocr}" "$@"
