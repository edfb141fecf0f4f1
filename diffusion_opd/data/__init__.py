"""Prompt data: prompt files and datasets (and the built-in video prompts), the training prompt
sampler, downloads, and the GenEval-style training-prompt generator."""
from .prompts import PromptDataset, load_prompt_file, load_task_prompts
from .sampler import PromptSampler

__all__ = ["PromptDataset", "PromptSampler", "load_prompt_file", "load_task_prompts"]
