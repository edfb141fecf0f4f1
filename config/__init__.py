"""The named configs (``--config config/opd.py:NAME``, or ``opd:NAME`` from anywhere); a wheel ships
this folder as diffusion_opd.named_configs (setup.py). The schema is diffusion_opd/configs/base.py."""
