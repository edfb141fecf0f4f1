"""Policies: model back ends behind one interface (see :mod:`diffusion_opd.models.base`).

Importing this package is cheap; diffusers / peft are imported when a policy is built.
``build_policy`` picks the back end (SD3 / SD3.5 or FLUX) from the pipeline folder's
``model_index.json`` (:mod:`diffusion_opd.models.family`).
"""
from .base import BASE, STUDENT, Policy, PromptEmbeds
from .family import build_policy, pipeline_family
from .specs import DEFAULT_LORA, DEFAULT_LORA_TARGETS, TeacherSpec


def __getattr__(name):  # the back-end classes import diffusers: only on demand
    if name == "SD3Policy":
        from .sd3 import SD3Policy

        return SD3Policy
    if name == "FluxPolicy":
        from .flux import FluxPolicy

        return FluxPolicy
    raise AttributeError(name)


__all__ = ["BASE", "STUDENT", "Policy", "PromptEmbeds", "DEFAULT_LORA", "DEFAULT_LORA_TARGETS", "TeacherSpec",
           "SD3Policy", "FluxPolicy", "build_policy", "pipeline_family"]
