"""Every shipped stage-1 config (config/nft.py, config/grpo.py) validates with the paper's
recipe facts; every stage-1 mistake fails with an error naming its key."""
import importlib.util
import os

import pytest

from diffusion_opd.config import ConfigError, load_config, validate_config
from diffusion_opd.data.prompts import run_prompts
from diffusion_opd.recipes import recipe_spec
from diffusion_opd.trainers.preflight import check_rewards
from diffusion_opd.trainers.recipes import cascade_stages
from tests.shared_data import make_data_root

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = {name: os.path.join(ROOT, "config", f"{name}.py") for name in ("nft", "grpo")}


def derived_geometry(config, world_size):
    return recipe_spec(config.recipe).derived_geometry(config, world_size)


def _module(path):
    spec = importlib.util.spec_from_file_location("stage1_cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SHIPPED = [(f, n) for f, path in FILES.items() for n in _module(path).CONFIGS]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(make_data_root(tmp_path_factory.mktemp("data")))


@pytest.mark.parametrize("file,name", SHIPPED, ids=[f"{f}:{n}" for f, n in SHIPPED])
def test_every_shipped_stage1_config_validates(file, name, data_root):
    config = load_config(f"{FILES[file]}:{name}", [f"data_root={data_root}"])
    world = 1 if name.startswith("tiny") else 8
    assert validate_config(config, world_size=world) is None
    prompts, _ = run_prompts(config, world)
    assert config.recipe == file and set(prompts) == set(config.tasks) and not config.teachers
    assert all(spec.reward for spec in config.tasks.values())
    geo = derived_geometry(config, world)
    assert geo["images_per_round"] == config.rl.groups_per_round * config.rl.group_size * len(config.tasks) * world


def test_paper_recipes(data_root):
    """The per-task teacher recipes of reference-facts section 4."""
    nft = load_config(f"{FILES['nft']}:geneval", [f"data_root={data_root}"])
    assert (nft.rl.advantage_std, nft.rl.advantage_clip, nft.rl.nft_beta, nft.rl.kl_beta) == ("global", 5.0, 1.0, 1e-4)
    assert (nft.lora.rank, nft.lora.alpha, nft.train.learning_rate, nft.train.weight_decay) == (32, 64, 3e-4, 1e-4)
    assert derived_geometry(nft, 8)["images_per_round"] == 48 * 24  # 48 groups x 24 images on 8 GPUs
    assert nft.sample.guidance_scale == 1.0 and nft.sample.noise_level == 0.0
    assert load_config(f"{FILES['nft']}:ocr").rl.nft_beta == 0.1
    for name, kl in (("ocr", 0.04), ("aesthetic", 0.01)):
        c = load_config(f"{FILES['grpo']}:{name}", [f"data_root={data_root}"])
        assert c.rl.guard and c.rl.drop_zero_advantage and c.rl.kl_beta == kl and c.rl.clip_range == 1e-4
        assert (c.sample.noise_level, c.sample.guidance_scale, c.train.num_train_steps) == (0.7, 4.5, 9)
    assert not load_config(f"{FILES['grpo']}:flow_grpo_ocr").rl.guard
    multi = load_config(f"{FILES['grpo']}:multitask")
    assert {t: s.reward for t, s in multi.tasks.items()} == {"ocr": "ocr", "aesthetic": "pickscore",
                                                              "geneval": "geneval"}
    assert cascade_stages(f"{FILES['nft']}:cascade")[1] == ("geneval", "ocr", "pickscore")


def _tiny(*overrides):
    return load_config(f"{FILES['grpo']}:tiny_grpo", list(overrides))


BAD = [
    ("grpo needs the SDE", lambda: _tiny("sample.noise_level=0"), "sample.noise_level: GRPO needs SDE"),
    ("a task without reward", lambda: _tiny("tasks.bright.reward="), "tasks.bright.reward: recipe 'grpo'"),
    ("unknown reward in a weighted sum", lambda: _tiny("tasks.bright.reward=brightness:1,beauty:2"),
     "tasks.bright.reward: unknown reward 'beauty'"),
    ("bad weight", lambda: _tiny("tasks.bright.reward=brightness:x"), "tasks.bright.reward: reward weight"),
    ("group of one", lambda: _tiny("rl.group_size=1"), "rl.group_size"),
    ("batch does not divide", lambda: _tiny("train.batch_size=5"), "train.batch_size: 5 does not divide the 16"),
    ("updates do not divide", lambda: _tiny("rl.updates_per_round=3"), "rl.updates_per_round: 3"),
    ("unknown advantage std", lambda: _tiny("rl.advantage_std=batch"), "rl.advantage_std"),
    ("too few prompts", lambda: _tiny("rl.groups_per_round=13", "train.batch_size=4", "rl.updates_per_round=1"),
     "tasks.bright.prompts: 12 prompts cannot fill a round of rl.groups_per_round"),
]


@pytest.mark.parametrize("label,make,message", BAD, ids=[b[0] for b in BAD])
def test_bad_stage1_configs_give_clear_errors(label, make, message):
    with pytest.raises(ConfigError, match=message):
        config = make()
        validate_config(config, world_size=1)  # the pure checks, then what needs files
        check_rewards(config)
        run_prompts(config, 1)


def test_unknown_cascade_lists_valid_ones():
    with pytest.raises(ConfigError, match="no cascade 'warp'.*valid: cascade, tiny_cascade"):
        cascade_stages(f"{FILES['nft']}:warp")
