"""diffusion_opd: multi-task on-policy distillation (OPD) of flow-matching text-to-image models,
and the stage-1 recipes that train its teachers (DiffusionNFT, Flow-GRPO).

Commands (each also ``python -m ...``): ``dopd-train`` (diffusion_opd.train), ``dopd-eval``
(diffusion_opd.evaluation), ``dopd-export`` (diffusion_opd.export), ``dopd-reward-server``
(diffusion_opd.rewards.serve), ``dopd-demo`` (diffusion_opd.demo). Importing the package loads
nothing heavy: torch and the model libraries load with the modules that need them.
"""
__version__ = "0.1.0"
