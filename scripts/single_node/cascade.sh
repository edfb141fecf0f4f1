#!/usr/bin/env bash
# Cascade NFT on one node: config/nft.py CASCADES (GenEval -> OCR -> PickScore), each stage
# starting from the previous stage's student; rerunning continues a killed cascade.
#   NUM_GPUS=8 bash scripts/single_node/cascade.sh output_dir=outputs/cascade_nft [key=value ...]
exec bash "$(dirname "$0")/launch.sh" --cascade "${CASCADE:-config/nft.py:cascade}" "$@"
