"""The config schema inside the package: ``base.get_config()`` holds every key with its default
(what :func:`diffusion_opd.config.validate_config` checks a config against) and the presets the
named configs under ``config/`` compose (``from diffusion_opd.configs import base``)."""
