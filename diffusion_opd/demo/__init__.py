"""`make demo` / `dopd-demo`: the paper's two claims end to end on a toy world (pipeline.py)."""
