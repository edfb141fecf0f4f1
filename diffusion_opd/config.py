"""Load a named config, apply dotted overrides, and validate it (:func:`validate_config`, a pure
function of the config; what needs files is checked next by ``trainers/preflight.py``).

``load_config("config/opd.py:mopd", ["train.learning_rate=1e-4", "save_every=5"])``. Overrides
may also be written the way absl / ml_collections ``config_flags`` users type them
(``--config.train.learning_rate=1e-4`` or ``--config.train.learning_rate 1e-4``): same keys,
same parsing, same errors. Every error names the offending key. The schema is diffusion_opd/configs/base.py: a key that is not there (outside
the user-named ``tasks.*`` / ``teachers.*`` entries) is rejected, with the closest valid key.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import math
import os
from typing import Any, Iterable, Optional, Sequence

import ml_collections
import torch

from .errors import ConfigError
from .models.base import BASE, STUDENT
from .models.specs import LORA_INIT_WORDS, LORA_INITS, TEACHER_KINDS



def _configs_dir() -> str:
    """The named configs' folder: the repo's config/, installed as the package diffusion_opd.named_configs
    (setup.py), so a wheel finds them as well as a clone."""
    spec = importlib.util.find_spec("diffusion_opd.named_configs")
    if spec is not None and spec.submodule_search_locations:
        return list(spec.submodule_search_locations)[0]
    clone = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config")
    if os.path.isdir(clone):  # a clone on PYTHONPATH, not installed
        return clone
    raise ConfigError("the named configs (package diffusion_opd.named_configs) are not installed; reinstall diffusion_opd")


def config_file(path: str) -> str:
    """``path`` when it is a file; else a named config shipped with the package: ``opd`` or
    ``opd.py`` -> ``<configs>/opd.py`` (so ``--config opd:mopd`` works from any folder)."""
    if os.path.isfile(path) or os.sep in path or "/" in path:
        return path
    name = path if path.endswith(".py") else f"{path}.py"
    shipped = os.path.join(_configs_dir(), name)
    return shipped if os.path.isfile(shipped) else path


CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "mixed_precision": ("no", "fp16", "bf16"),
    "model.dtype": ("fp32", "fp16", "bf16"),
    "model.guidance": ("auto", "embedded", "true_cfg"),
    "train.mode": ("fused", "two_pass"),
    "train.loss": ("auto", "l2", "kl", "ppo"),
    "train.loss_reduction": ("mean", "sum"),
    "train.kl_denominator": ("true", "released"),
    "train.step_selection": ("first", "random"),
    "train.lr_schedule": ("constant", "cosine", "linear"),
    "rl.advantage_std": ("group", "global", "none"),
    "rl.cfg_grad": ("detach_uncond", "both"),
    "rl.nft_sampler": ("dpm2", "euler"),
    "rl.nft_step_sampling": ("per_sample", "first"),
    "logging.wandb_mode": ("online", "offline", "disabled"),
    "perf.compile": ("auto", "on", "off"),
    "distributed.strategy": ("ddp", "fsdp"),
    "distributed.text_encoders": ("replicate", "shard", "rank0"),
}
USER_NAMED = ("tasks", "teachers")  # sections whose entry names are the user's


def _import_file(path: str, module_name: str):
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"config file {path} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def base_config() -> ml_collections.ConfigDict:
    """Every key with its default (the schema, diffusion_opd/configs/base.py)."""
    from .configs import base

    return base.get_config()


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """``spec`` is ``path/to/file.py[:NAME]`` or a shipped config ``opd[:NAME]`` (:func:`config_file`);
    ``overrides`` are ``key.sub=value`` strings."""
    path, _, name = spec.partition(":")
    path = config_file(path)
    if not os.path.isfile(path):
        shipped = sorted(f[:-3] for f in os.listdir(_configs_dir()) if f.endswith(".py") and not f.startswith("_"))
        raise ConfigError(f"--config: file {path!r} not found (a file path, or a shipped config: {', '.join(shipped)})")
    module = _import_file(path, "_diffusion_opd_user_config")
    try:
        config = module.get_config(name) if name else module.get_config()
    except (KeyError, ValueError) as err:  # the file's own refusal of NAME, e.g. "unknown config 'x'; valid: ..."
        raise ConfigError(f"--config {spec}: {err.args[0] if err.args else err}") from None
    for item in normalise_overrides(overrides):
        apply_override(config, item)
    return config


ABSL_PREFIX = "config."  # ``--config.key=value``: the absl config_flags spelling of ``key=value``


def normalise_overrides(args: Sequence[str]) -> list[str]:
    """Command-line words -> ``key=value`` strings.

    Accepts ``key=value``, ``--key=value``, ``--config.key=value`` and the two-word absl form
    ``--config.key value``. The ``config.`` prefix is dropped (the schema has no ``config`` key).
    """
    out, args, i = [], list(args), 0
    while i < len(args):
        item = args[i].lstrip("-")
        if item.startswith(ABSL_PREFIX):
            item = item[len(ABSL_PREFIX):]
            if "=" not in item and i + 1 < len(args) and not args[i + 1].startswith("--"):
                item, i = f"{item}={args[i + 1]}", i + 1
        out.append(item)
        i += 1
    return out


def _parse_value(text: str, current: Any) -> Any:
    if isinstance(current, bool):
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, (tuple, list)):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = [v.strip() for v in text.split(",") if v.strip()]
        return type(current)(value if isinstance(value, (list, tuple)) else [value])
    return text


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
    """Set ``key.sub=value`` on ``config``, parsing ``value`` as the type of the current value.
    ``--key=value`` and ``--config.key=value`` (absl) name the same key."""
    item = item.lstrip("-")
    key, sep, text = (item[len(ABSL_PREFIX):] if item.startswith(ABSL_PREFIX) else item).partition("=")
    if not sep:
        raise ConfigError(f"override {item!r}: expected key=value")
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts):
        so_far = ".".join(parts[: i + 1])
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            close = difflib.get_close_matches(part, valid, n=1)
            hint = f"; did you mean '{'.'.join(parts[:i] + close)}'?" if close else ""
            raise ConfigError(f"unknown config key '{so_far}'{hint} (valid here: {', '.join(valid)})")
        if i < len(parts) - 1:
            node = node[part]
    if len(parts) == 3 and parts[0] == "tasks" and parts[2] in ("prompts", "eval_prompts"):
        with node.ignore_type():  # a prompt source is a name / path (str) or a list, whatever it was
            node[parts[2]] = parse_prompt_source(key, text)
        return
    try:
        node[parts[-1]] = _parse_value(text, node[parts[-1]])
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{key}: cannot set {text!r}: {err}") from None


def _walk(node: ml_collections.ConfigDict, prefix: str = "") -> Iterable[tuple[str, Any]]:
    for k, v in node.items():
        path = f"{prefix}{k}"
        yield path, v
        if isinstance(v, ml_collections.ConfigDict) and path not in USER_NAMED:
            yield from _walk(v, path + ".")


def _get(config, key: str):
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def _check_schema(config, schema) -> None:
    schema_keys = dict(_walk(schema))
    for key, _ in _walk(config):
        if key.split(".")[0] in USER_NAMED and "." in key:
            continue
        if key not in schema_keys:
            close = difflib.get_close_matches(key, list(schema_keys), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{key}'{hint}")
    for key, default in schema_keys.items():
        try:
            _get(config, key)
        except KeyError:
            raise ConfigError(f"config key '{key}' is missing (default: {default!r}, diffusion_opd/configs/base.py)") from None


def _entry_keys(section: str) -> set[str]:
    from .configs import base

    example = base.task("p", "t") if section == "tasks" else base.teacher("p")
    return set(example.keys())


def _check_entries(config, task_needs: str) -> None:
    """The user-named sections: teachers (adapter names peft can use) and tasks (a teacher or a
    reward each, as the recipe needs; a prompt source that is unambiguously a list or a name / path)."""
    opd = task_needs == "teacher"  # distillation; the stage-1 recipes (nft, grpo) train on rewards
    if opd and not config.teachers:
        raise ConfigError("teachers: no teacher configured")
    for name, spec in config.teachers.items():
        if name in (STUDENT, BASE):
            raise ConfigError(f"teachers.{name}: '{name}' is reserved")
        if not name.isidentifier() or hasattr(torch.nn.Module, name):
            # peft registers adapters as module attributes: 'eval', 'train', 'forward'... collide
            raise ConfigError(f"teachers.{name}: not usable as an adapter name (a Python identifier that is not "
                              "a torch.nn.Module attribute, e.g. 'geneval_teacher')")
        if set(spec.keys()) != _entry_keys("teachers"):
            raise ConfigError(f"teachers.{name}: keys {sorted(spec.keys())} != {sorted(_entry_keys('teachers'))}")
        if spec.kind not in TEACHER_KINDS:
            raise ConfigError(f"teachers.{name}.kind: {spec.kind!r} is not one of {', '.join(TEACHER_KINDS)}")
        if not spec.path:
            raise ConfigError(f"teachers.{name}.path: empty")
        if not spec.guidance_scale >= 0:
            raise ConfigError(f"teachers.{name}.guidance_scale: must be >= 0")
    if not config.tasks:
        raise ConfigError("tasks: no task configured")
    for name, spec in config.tasks.items():
        if set(spec.keys()) != _entry_keys("tasks"):
            raise ConfigError(f"tasks.{name}: keys {sorted(spec.keys())} != {sorted(_entry_keys('tasks'))}")
        if opd and not spec.teacher:
            raise ConfigError(f"tasks.{name}.teacher: every task needs a teacher (valid: {', '.join(config.teachers)})")
        if task_needs == "reward" and not spec.reward:
            raise ConfigError(f"tasks.{name}.reward: recipe '{config.recipe}' trains on rewards; name one "
                              "(e.g. 'ocr' or 'ocr:1.0,pickscore:0.5')")
        if opd and spec.teacher not in config.teachers:
            raise ConfigError(
                f"tasks.{name}.teacher: unknown teacher '{spec.teacher}'; valid teachers: {', '.join(config.teachers)}"
            )
        for field in ("prompts", "eval_prompts"):
            _check_prompt_source(f"tasks.{name}.{field}", spec[field], required=field == "prompts")


_PROMPT_FILE_SUFFIXES = (".txt", ".jsonl")


def _check_prompt_source(key: str, source, required: bool) -> None:
    """A prompt source is a dataset name / file path (a string) or a list of prompts; a
    one-item list holding a file path is what a mistyped override produces: refused."""
    if isinstance(source, str):
        if required and not source.strip():
            raise ConfigError(f"{key}: empty; give a dataset name, a prompt file path or a list of prompts")
        return
    if not isinstance(source, (list, tuple)) or not all(isinstance(p, str) and p.strip() for p in source):
        raise ConfigError(f"{key}: expected a dataset name, a file path or a list of non-empty prompt strings, "
                          f"got {source!r}")
    if required and not source:
        raise ConfigError(f"{key}: empty prompt list")
    if len(source) == 1 and source[0].strip().endswith(_PROMPT_FILE_SUFFIXES):
        raise ConfigError(f"{key}: a one-prompt list {list(source)!r} that looks like a file path is ambiguous; "
                          f"give the path as a string ({key}={source[0]}) or more than one prompt")


def parse_prompt_source(key: str, text: str):
    """A ``tasks.<task>.prompts`` / ``eval_prompts`` value typed on the command line.

    ``['a cat', 'a dog']`` (a Python list literal) is a list of prompts; anything else without
    a comma is a dataset name or a file path (``/tmp/p.txt``); a bare comma-separated value is
    ambiguous (a list? a prompt with a comma?) and refused.
    """
    text = text.strip()
    if text[:1] in "[(" and text:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ConfigError(f"{key}: {text!r} is not a valid list; write it as \"['a cat', 'a dog']\"") from None
        if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
            raise ConfigError(f"{key}: expected a list of prompt strings, got {value!r}")
        return tuple(value)
    if "," in text:
        raise ConfigError(f"{key}: {text!r} is ambiguous: give a list of prompts as \"['a cat', 'a dog']\" "
                          "or a dataset name / file path without commas")
    return text


def _check_finite(config) -> None:
    for key, value in _walk(config):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value}")


def validate_config(config, *, world_size: int = 1) -> None:
    """Raise :class:`ConfigError` naming the key of the first problem found.

    A pure function of the config (and the number of processes): no file is read and nothing
    is loaded. What needs files (prompt sets, the backbone's module names, the state of
    ``output_dir``) is checked next, still before any weight loads, by
    :func:`diffusion_opd.trainers.preflight.preflight`, which ``--validate_only`` runs too.
    """
    from .recipes import recipe_spec

    _check_schema(config, base_config())
    spec = recipe_spec(config.recipe)  # the recipe's own rules come from the registry
    _check_finite(config)
    for key, valid in CHOICES.items():
        if _get(config, key) not in valid:
            raise ConfigError(f"{key}: {_get(config, key)!r} is not one of {', '.join(valid)}")

    s, t, lora = config.sample, config.train, config.lora
    positive = {
        "sample.num_steps": s.num_steps, "sample.resolution": s.resolution, "train.batch_size": t.batch_size,
        "train.grad_accum": t.grad_accum, "train.num_rounds": t.num_rounds, "train.num_train_steps": t.num_train_steps,
        "train.learning_rate": t.learning_rate, "train.adam_eps": t.adam_eps, "save_every": config.save_every,
        "keep_last": config.keep_last, "train.nan_patience": t.nan_patience, "lora.rank": lora.rank,
        "lora.alpha": lora.alpha, "model.max_sequence_length": config.model.max_sequence_length,
        "eval.num_prompts": config.eval.num_prompts, "eval.num_steps": config.eval.num_steps,
    }
    for key, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{key}: must be > 0, got {value}")
    if not isinstance(config.perf.compile_backend, str) or not config.perf.compile_backend:
        raise ConfigError("perf.compile_backend: a torch.compile backend name (inductor, aot_eager, eager)")
    non_negative = {
        "cpu_threads": config.cpu_threads, "seed": config.seed, "train.warmup_rounds": t.warmup_rounds,
        "train.weight_decay": t.weight_decay, "train.max_grad_norm": t.max_grad_norm,
        "train.stop_after_round": t.stop_after_round, "sample.noise_level": s.noise_level,
        "sample.guidance_scale": s.guidance_scale, "model.guidance_scale_2": config.model.guidance_scale_2,
        "eval.every": config.eval.every, "eval.sample_images": config.eval.sample_images,
        "expect_world_size": config.expect_world_size, "distributed.gpu_memory_gb": config.distributed.gpu_memory_gb,
    }
    for key, value in non_negative.items():
        if not value >= 0:
            raise ConfigError(f"{key}: must be >= 0, got {value}")
    for key in ("train.adam_beta1", "train.adam_beta2", "train.ema_decay", "logging.curve_smoothing"):
        if not 0 <= _get(config, key) < 1:
            raise ConfigError(f"{key}: must be in [0, 1), got {_get(config, key)}")
    if not (s.shift == 0 or s.shift > 0):
        raise ConfigError(f"sample.shift: must be > 0 (or 0 for the pipeline scheduler's own shift), got {s.shift}")
    if config.model.max_sequence_length > 512:
        raise ConfigError(f"model.max_sequence_length: at most 512 (T5's limit), got {config.model.max_sequence_length}")
    if not str(config.model.path).strip():
        raise ConfigError("model.path: empty; give a Hub id (stabilityai/stable-diffusion-3.5-medium) or a local "
                          "diffusers pipeline folder")
    if not str(config.output_dir).strip():
        raise ConfigError("output_dir: empty")
    if not lora.target_modules or not all(isinstance(m, str) and m for m in lora.target_modules):
        raise ConfigError(f"lora.target_modules: expected a non-empty list of module names, got {lora.target_modules!r}")
    if config.overwrite and config.resume_from:
        raise ConfigError(f"overwrite: true together with resume_from={config.resume_from!r}; choose one "
                          "(resume the run, or move it aside and start a new one)")
    if t.num_train_steps > s.num_steps:
        raise ConfigError(f"train.num_train_steps: {t.num_train_steps} > sample.num_steps ({s.num_steps})")
    if s.num_frames:
        from .models.specs import check_num_frames

        check_num_frames(s.num_frames)
    from .video import frame_indices

    try:
        frame_indices(81, s.reward_frames)
    except ValueError as err:
        raise ConfigError(f"sample.reward_frames: {err}") from None
    if s.frame_reduce not in ("mean", "min"):
        raise ConfigError(f"sample.frame_reduce: must be 'mean' or 'min', got {s.frame_reduce!r}")
    if s.resolution % 16:
        raise ConfigError(f"sample.resolution: {s.resolution} is not a multiple of 16 (VAE x8 * patch 2)")
    if t.loss in ("kl", "ppo") and s.noise_level == 0:
        raise ConfigError(
            f"train.loss: '{t.loss}' needs an SDE rollout (sample.noise_level > 0); with the ODE use 'l2' or 'auto'"
        )
    if t.loss == "ppo" and t.mode != "fused":
        raise ConfigError("train.loss: 'ppo' needs train.mode='fused' (it uses the sampled action of the rollout)")
    if config.device == "cpu" and config.mixed_precision == "fp16":
        raise ConfigError("mixed_precision: fp16 autocast is not available on the CPU; use 'no' or 'bf16'")
    _check_trackers(config)
    if config.expect_world_size and config.expect_world_size != world_size:
        raise ConfigError(
            f"expect_world_size: {config.expect_world_size} processes expected but {world_size} started "
            "(on the CPU use torchrun --nproc_per_node N, or accelerate launch --multi_gpu --num_processes N; `accelerate launch --cpu` starts one process)"
        )
    check_student_init(config)
    if LORA_INIT_WORDS.get(lora.init, lora.init) not in LORA_INITS:
        raise ConfigError(f"lora.init: {lora.init!r} is not one of gaussian, true, false")
    _check_entries(config, spec.task_needs)
    spec.check(config)


def _check_trackers(config) -> None:
    """``logging.trackers``: names accelerate knows, each installed (accelerate drops a missing one
    silently)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    raw = config.logging.trackers
    if not isinstance(raw, str):
        raise ConfigError(f"logging.trackers: a comma-separated string (e.g. 'wandb,tensorboard'), got {raw!r}")
    available = {str(t) for t in get_available_trackers()}
    for name in (n.strip() for n in raw.split(",") if n.strip()):
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(f"logging.trackers: unknown tracker {name!r}; valid: {', '.join(sorted(LOGGER_TYPE_TO_CLASS))}")
        if name not in available:
            extra = f"'diffusion_opd[{name}]'" if name in ("wandb", "tensorboard") else name
            raise ConfigError(f"logging.trackers: {name} is not installed; pip install {extra}, or drop it")
    if config.logging.wandb_mode in ("online", "offline") and "wandb" not in available:
        raise ConfigError(f"logging.wandb_mode: {config.logging.wandb_mode} needs wandb, which is not installed; "
                          "pip install 'diffusion_opd[wandb]', or set logging.wandb_mode=disabled")


def check_student_init(config) -> None:
    """``model.student_init`` brings its own rank, alpha and targets (compared with ``lora.*`` when
    the adapter is read, before the backbone loads); here only what needs no file."""
    m = config.model
    if m.student_init_subfolder and not m.student_init:
        raise ConfigError("model.student_init_subfolder: set but model.student_init is empty")
    if m.student_init and config.lora.init != base_config().lora.init:
        raise ConfigError(f"lora.init: {config.lora.init!r} has no effect with model.student_init (the student starts "
                          "as that adapter's weights); drop one of them")

def to_dict(config) -> dict:
    """A JSON-able copy (tuples become lists)."""
    return ml_collections.ConfigDict(config).to_dict()


def from_dict(data: dict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(data)
