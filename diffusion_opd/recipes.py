"""The recipe registry: which recipes exist and what each one declares about itself.

A recipe is one file (``trainers/opd.py``, ``trainers/nft.py``, ``trainers/grpo.py``, or a
user's module) that defines its round and registers a :class:`RecipeSpec`: its name (the
config's ``recipe``), its config section, its own checks, how many prompts a process draws per
task and round, how many images each prompt gives, and the geometry printed at start. The
config checks, preflight, ``scripts/train.py``, the prompt checks and the demo ask the registry
instead of branching on recipe names, so a new recipe touches no other file.

    register(RecipeSpec("mine", build=Mine, prompts_keys=("train.batch_size",)))
    config.recipe = "mine"; train(config)

The built-in recipes register when their module is imported; :func:`recipe_spec` imports it on
first use, so this module imports nothing heavy.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .errors import ConfigError

__all__ = ["BUILTIN", "RecipeSpec", "recipe_names", "recipe_spec", "register"]

# name -> the module that registers it (imported on first use)
BUILTIN = {"opd": "diffusion_opd.trainers.opd", "nft": "diffusion_opd.trainers.nft", "grpo": "diffusion_opd.trainers.grpo"}
TASK_NEEDS = ("teacher", "reward", "")


def _no_checks(config) -> None:
    return None


def _one(config) -> int:
    return 1


@dataclass(frozen=True)
class RecipeSpec:
    """What a recipe declares. ``build(run)`` returns its round object (the ``Recipe`` protocol of
    ``trainers/run.py``)."""

    name: str
    build: Callable[[Any], Any]
    prompts_keys: tuple[str, ...]  # config keys whose product is the prompts a process draws per task and round
    task_needs: str = "reward"  # what every task must name: "teacher" (distillation), "reward" (RL) or ""
    section: str = ""  # the config section of the recipe's own keys ("rl"), "" if none
    check: Callable[[Any], None] = _no_checks  # its own checks: ConfigError naming the key
    images_per_prompt: Callable[[Any], int] = _one  # images rolled out per drawn prompt
    optimizer_steps_per_round: Callable[[Any], int] = _one  # optimizer steps a round takes (the lr schedule's unit)
    geometry: Optional[Callable[[Any, int], dict]] = None  # extra numbers printed at start
    description: str = field(default="", compare=False)

    def prompts_per_round(self, config) -> int:
        """Prompts each process draws per task and round."""
        return math.prod(int(_get(config, key)) for key in self.prompts_keys)

    def images_per_round(self, config, world_size: int) -> int:
        """Images rolled out per round over every task and process."""
        return self.prompts_per_round(config) * self.images_per_prompt(config) * len(config.tasks) * world_size

    def prompts_text(self, config, world_size: int) -> str:
        """How the prompts of a round are counted, for messages: ``a x b x world size = ...``."""
        keys = " x ".join([*self.prompts_keys, "world size"])
        values = " x ".join([*(str(_get(config, k)) for k in self.prompts_keys), str(world_size)])
        return f"{keys} = {values}"

    def derived_geometry(self, config, world_size: int) -> dict[str, Any]:
        """The numbers a researcher wants to see before a run (printed at start)."""
        out = {"world_size": world_size, "recipe": self.name, "tasks": list(config.tasks),
               "images_per_round": self.images_per_round(config, world_size)}
        if self.geometry is not None:
            out.update(self.geometry(config, world_size))
        return out


def _get(config, key: str):
    node = config
    for part in key.split("."):
        node = node[part]
    return node


_REGISTRY: dict[str, RecipeSpec] = {}


def register(spec: RecipeSpec) -> RecipeSpec:
    """Make ``spec`` trainable as ``recipe=<spec.name>``; returns it. Registering a name again
    replaces the earlier spec (a module reloaded)."""
    if spec.task_needs not in TASK_NEEDS:
        raise ValueError(f"recipe {spec.name}: task_needs {spec.task_needs!r} is not one of {TASK_NEEDS}")
    _REGISTRY[spec.name] = spec
    return spec


def recipe_names() -> list[str]:
    return list(dict.fromkeys([*BUILTIN, *_REGISTRY]))


def recipe_spec(name: str) -> RecipeSpec:
    """The spec of recipe ``name`` (a built-in one is imported on first use); ConfigError naming
    the valid recipes otherwise."""
    if name not in _REGISTRY and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    if name not in _REGISTRY:
        raise ConfigError(f"recipe: {name!r} is not one of {', '.join(recipe_names())}")
    return _REGISTRY[name]
