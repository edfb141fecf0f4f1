"""The defaults of every run, as a named config file: ``--config config/base.py``.

The schema itself lives in the package (diffusion_opd/configs/base.py), so an installed
``diffusion_opd`` has it without this folder; named configs import it as
``from diffusion_opd.configs import base``.
"""
from diffusion_opd.configs.base import get_config  # noqa: F401
