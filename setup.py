# The metadata is in pyproject.toml. This file only maps the repo's user-facing config/ folder to
# the package diffusion_opd.named_configs, so a wheel carries the named configs (``--config opd:mopd``)
# while a clone keeps editing config/*.py where they are.
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["diffusion_opd", "diffusion_opd.*"]) + ["diffusion_opd.named_configs"],
    package_dir={"diffusion_opd.named_configs": "config"},
)
