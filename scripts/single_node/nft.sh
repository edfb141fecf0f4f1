#!/usr/bin/env bash
# Stage 1 on one node: DiffusionNFT (config/nft.py; see launch.sh for NUM_GPUS / MAIN_PORT).
#   NAME=geneval NUM_GPUS=8 bash scripts/single_node/nft.sh [key=value ...]
#   NAME=multitask bash scripts/single_node/nft.sh output_dir=outputs/x
exec bash "$(dirname "$0")/launch.sh" --config "config/nft.py:${NAME:-geneval}" "$@"
