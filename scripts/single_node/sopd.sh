#!/usr/bin/env bash
# Single-teacher OPD on one node (TASK = geneval | ocr | pickscore; see launch.sh for NUM_GPUS).
#   TASK=ocr NUM_GPUS=8 bash scripts/single_node/sopd.sh [key=value ...]
exec bash "$(dirname "$0")/launch.sh" --config "config/opd.py:sopd_${TASK:-geneval}" "$@"
