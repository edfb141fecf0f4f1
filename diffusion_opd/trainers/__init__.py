"""Training: the run skeleton (run.py) and the recipes (opd.py, nft.py, grpo.py)."""
