"""Every config of config/demo.py validates, has a shortened version, and runs on the toy model."""
import importlib.util
import os

import pytest

from diffusion_opd.config import load_config, validate_config
from diffusion_opd.data.prompts import run_prompts
from diffusion_opd.data import toy_world as world

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, "config", "demo.py")
_spec = importlib.util.spec_from_file_location("demo_cfg", DEMO)
demo_cfg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo_cfg)


@pytest.mark.parametrize("name", list(demo_cfg.CONFIGS))
def test_every_demo_config_validates(name):
    config = load_config(f"{DEMO}:{name}")
    validate_config(config)
    prompts, _ = run_prompts(config, 1)
    assert set(prompts) <= set(world.TASKS) and name in demo_cfg.QUICK
    for task, spec in config.tasks.items():
        assert spec.reward == world.TASKS[task][0]  # each task scored by its own reward
    assert config.model.path.startswith(demo_cfg.ROOT) and config.sample.resolution == 16


def test_unknown_demo_config_lists_valid_ones():
    with pytest.raises(ValueError, match="valid: teacher_colour, "):
        load_config(f"{DEMO}:nope")
