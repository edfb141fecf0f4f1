#!/usr/bin/env bash
# Multi-teacher OPD on one node (see launch.sh for NUM_GPUS / MAIN_PORT).
#   bash scripts/single_node/mopd.sh                       # 8 GPUs, config/opd.py:mopd
#   NUM_GPUS=4 CONFIG=config/opd.py:mopd_sde bash scripts/single_node/mopd.sh output_dir=outputs/x
# Extra arguments are config overrides (key=value).
exec bash "$(dirname "$0")/launch.sh" --config "${CONFIG:-config/opd.py:mopd}" "$@"
