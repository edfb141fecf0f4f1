"""Every shipped config validates; every bad config fails with an error that names its key."""
import importlib.util
import os
import subprocess
import sys

import pytest

from diffusion_opd.config import ConfigError, apply_override, load_config, to_dict, validate_config
from diffusion_opd.data.prompts import run_prompts
from diffusion_opd.recipes import recipe_spec
from diffusion_opd.trainers.preflight import check_rewards
from tests.shared_data import make_data_root

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPD = os.path.join(ROOT, "config", "opd.py")


def derived_geometry(config, world_size):
    return recipe_spec(config.recipe).derived_geometry(config, world_size)


def _names():
    spec = importlib.util.spec_from_file_location("opd_cfg", OPD)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return list(mod.CONFIGS)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(make_data_root(tmp_path_factory.mktemp("data")))


@pytest.mark.parametrize("name", _names())
def test_every_shipped_config_validates(name, data_root):
    config = load_config(f"{OPD}:{name}", [f"data_root={data_root}"])
    world = 1 if name.startswith("tiny") else 8  # the CPU configs run on one process
    assert validate_config(config, world_size=world) is None  # pure: checks, returns nothing
    prompts, _ = run_prompts(config, world)
    assert set(prompts) == set(config.tasks)
    assert all(len(rows) >= config.train.batch_size for rows in prompts.values())
    geo = derived_geometry(config, 8)
    assert geo["images_per_round"] == config.train.batch_size * config.train.grad_accum * len(config.tasks) * 8


def test_released_recipe_geometry(data_root):
    c = load_config(f"{OPD}:mopd", [f"data_root={data_root}"])
    geo = derived_geometry(c, 8)
    assert geo["images_per_round"] == 72  # 3 per GPU x 3 tasks x 8 GPUs (reference-facts section 3)
    assert geo["trained_steps_per_image"] == "9 of 10" and geo["loss"] == "l2"
    assert {n: t.guidance_scale for n, t in c.teachers.items()} == {"geneval": 1.0, "ocr": 4.5, "aesthetic": 4.5}
    assert c.sample.guidance_scale == 4.5 and c.train.learning_rate == 3e-4 and c.train.ema_decay == 0.9
    sde = load_config(f"{OPD}:mopd_sde", [f"data_root={data_root}"])
    assert sde.sample.noise_level == 0.7 and derived_geometry(sde, 8)["loss"] == "kl"


def test_overrides_are_typed(data_root):
    c = load_config(f"{OPD}:tiny_mopd", ["--train.learning_rate=1e-2", "save_every=5", "train.mode=two_pass",
                                         "model.gradient_checkpointing=true"])
    assert c.train.learning_rate == 1e-2 and c.save_every == 5 and c.train.mode == "two_pass"
    assert c.model.gradient_checkpointing is True


def _tiny(*overrides):
    return load_config(f"{OPD}:tiny_mopd", list(overrides))


BAD = [
    ("unknown override key", lambda: _tiny("train.learnig_rate=1"), "train.learnig_rate.*did you mean 'train.learning_rate'"),
    ("bad value type", lambda: _tiny("train.batch_size=two"), "train.batch_size"),
    ("unknown choice", lambda: _tiny("train.mode=fast"), "train.mode.*fused, two_pass"),
    ("kl with ODE", lambda: _tiny("train.loss=kl"), "train.loss.*noise_level"),
    ("more trained steps than steps", lambda: _tiny("train.num_train_steps=7"), "train.num_train_steps"),
    ("resolution not /16", lambda: _tiny("sample.resolution=72"), "sample.resolution.*multiple of 16"),
    ("batch larger than prompts", lambda: _tiny("train.batch_size=7", "train.grad_accum=2"), "tasks.objects.prompts.*12 prompts cannot fill a round of.* = 14"),
    ("world size mismatch", lambda: _tiny("expect_world_size=2"), "expect_world_size"),
    # issue 11: every key that can break a run is refused before anything loads
    ("negative warmup", lambda: _tiny("train.warmup_rounds=-3"), "train.warmup_rounds: must be >= 0, got -3"),
    ("unknown tracker", lambda: _tiny("logging.trackers=wandb,tensorbord"), "logging.trackers: unknown tracker 'tensorbord'"),
    ("smoothing of 1", lambda: _tiny("logging.curve_smoothing=1.0"), r"logging.curve_smoothing: must be in \[0, 1\), got 1.0"),
    ("unknown schedule", lambda: _tiny("train.lr_schedule=cosine_warm"), "train.lr_schedule: 'cosine_warm' is not one of constant, cosine, linear"),
    ("infinite learning rate", lambda: _tiny("train.learning_rate=inf"), "train.learning_rate: must be a finite number"),
    ("zero learning rate", lambda: _tiny("train.learning_rate=0"), "train.learning_rate: must be > 0"),
    ("nan beta", lambda: _tiny("train.adam_beta2=nan"), "train.adam_beta2: must be a finite number"),
    ("beta of 1", lambda: _tiny("train.adam_beta1=1.0"), r"train.adam_beta1: must be in \[0, 1\)"),
    ("negative weight decay", lambda: _tiny("train.weight_decay=-0.1"), "train.weight_decay: must be >= 0"),
    ("negative lora rank", lambda: _tiny("lora.rank=-4"), "lora.rank: must be > 0, got -4"),
    ("zero lora alpha", lambda: _tiny("lora.alpha=0"), "lora.alpha: must be > 0"),
    ("no target modules", lambda: _tiny("lora.target_modules=[]"), "lora.target_modules: expected a non-empty list"),
    ("zero sequence length", lambda: _tiny("model.max_sequence_length=0"), "model.max_sequence_length: must be > 0"),
    ("negative shift", lambda: _tiny("sample.shift=-1.0"), "sample.shift: must be > 0"),
    ("empty model path", lambda: _tiny("model.path="), "model.path: empty"),
    ("overwrite and resume", lambda: _tiny("overwrite=true", "resume_from=latest"), "overwrite: true together with"),
    ("ambiguous prompt list", lambda: _tiny("tasks.objects.prompts=['p.txt']"), "tasks.objects.prompts: a one-prompt list"),
]


@pytest.mark.parametrize("label,make,message", BAD, ids=[b[0] for b in BAD])
def test_bad_configs_give_clear_errors(label, make, message):
    with pytest.raises(ConfigError, match=message):
        config = make()
        validate_config(config, world_size=1)
        run_prompts(config, 1)


def test_prompts_on_the_command_line_are_a_path_a_list_or_an_error(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("".join(f"a prompt number {i}\n" for i in range(5)))
    c = _tiny(f"tasks.objects.prompts={path}", "tasks.signs.prompts=['a cat', 'a dog']", "train.batch_size=1")
    assert c.tasks.objects.prompts == str(path)  # read as a path, not as the one prompt "/tmp/.../p.txt"
    assert c.tasks.signs.prompts == ("a cat", "a dog")
    train, _ = run_prompts(c, 1)
    assert train["objects"].prompts == [f"a prompt number {i}" for i in range(5)]
    assert train["signs"].prompts == ["a cat", "a dog"]
    with pytest.raises(ConfigError, match="tasks.objects.prompts: 'a cat,a dog' is ambiguous"):
        _tiny("tasks.objects.prompts=a cat,a dog")
    with pytest.raises(ConfigError, match="tasks.objects.prompts: .* is not a valid list"):
        _tiny("tasks.objects.prompts=['a cat'")
    missing = _tiny(f"tasks.objects.prompts={tmp_path / 'nope.txt'}")
    with pytest.raises(ConfigError, match="tasks.objects.prompts: prompt file not found: .*nope.txt"):
        run_prompts(missing, 1)


def test_validate_only_catches_what_a_run_would_in_one_line(tmp_path, capsys):
    """lora.rank=-4 used to pass --validate_only (a real subprocess: one line, exit 2, no
    traceback); a target-module typo is caught from the backbone's config, before any weight."""
    args = ["--config", "config/opd.py:tiny_mopd", "--validate_only", f"output_dir={tmp_path}/run"]
    result = subprocess.run([sys.executable, "scripts/train_opd.py", *args, "lora.rank=-4"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == ["error: lora.rank: must be > 0, got -4"], result.stderr
    assert "Traceback" not in result.stdout + result.stderr

    spec = importlib.util.spec_from_file_location("train_opd_script", os.path.join(ROOT, "scripts", "train_opd.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        typo = script.main(args + ["lora.target_modules=['attn.to_q','attn.to_qq']"])
        assert typo == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            "error: lora.target_modules: 'attn.to_qq' matches no Linear/Conv/Embedding layer of "
            "SD3Transformer2DModel (builtin:tiny-sd3); closest: attn.to_q, attn2.to_q, attn.to_v"]
        assert script.main(args) == 0
        assert "images_per_round" in capsys.readouterr().out
    finally:
        os.chdir(cwd)


def test_unknown_key_in_a_config_file_is_rejected():
    c = _tiny()
    c.train.unlisted = 3  # a typo in a user's config file
    with pytest.raises(ConfigError, match="unknown config key 'train.unlisted'"):
        validate_config(c)


def test_unknown_teacher_and_task_without_teacher():
    c = _tiny()
    c.tasks.objects.teacher = "teacher_z"
    with pytest.raises(ConfigError, match="tasks.objects.teacher: unknown teacher 'teacher_z'; valid teachers: teacher_a, teacher_b"):
        validate_config(c)
    c.tasks.objects.teacher = ""
    with pytest.raises(ConfigError, match="tasks.objects.teacher: every task needs a teacher"):
        validate_config(c)


def test_missing_prompt_file_says_how_to_get_it(tmp_path):
    c = load_config(f"{OPD}:sopd_ocr", [f"data_root={tmp_path}"])
    validate_config(c, world_size=8)  # pure: does not look at files
    with pytest.raises(ConfigError, match=r"(?s)tasks.ocr.prompts:.*ocr/train.txt.*download_data.py --dataset ocr"):
        run_prompts(c, 8)


def test_unknown_reward_and_reserved_teacher_name():
    c = _tiny()
    c.tasks.objects.reward = "beauty"
    with pytest.raises(ConfigError, match="tasks.objects.reward: unknown reward 'beauty'; valid rewards: aesthetic"):
        check_rewards(c)
    c = _tiny()
    c.teachers.student = c.teachers.teacher_a
    with pytest.raises(ConfigError, match="teachers.student: 'student' is reserved"):
        validate_config(c)
    c = _tiny()
    c.teachers.eval = c.teachers.teacher_a  # would collide with nn.Module.eval inside peft
    with pytest.raises(ConfigError, match="teachers.eval: not usable as an adapter name"):
        validate_config(c)


def test_unknown_config_name_lists_valid_ones():
    with pytest.raises(ValueError, match="valid: mopd, mopd_sde"):
        load_config(f"{OPD}:mopd_fast")


def test_override_needs_equals():
    with pytest.raises(ConfigError, match="key=value"):
        apply_override(_tiny(), "train.mode")


def test_flux_and_sd35_large_recipes(data_root):
    """flux_mopd: the released recipe's geometry on FLUX.1-dev (guidance embedding, the dynamic
    shift, FLUX LoRA targets); sd35_large_mopd: the same recipe and code path on SD3.5-Large."""
    from diffusion_opd.models.specs import DEFAULT_LORA_TARGETS

    mopd = load_config(f"{OPD}:mopd", [f"data_root={data_root}"])
    flux = load_config(f"{OPD}:flux_mopd", [f"data_root={data_root}", "teachers.ocr.path=/ckpt/flux_ocr",
                                            "teachers.ocr.subfolder=lora"])
    assert flux.model.path == "black-forest-labs/FLUX.1-dev" and flux.model.guidance == "embedded"
    assert flux.sample.resolution == 512 and flux.sample.shift == 0 and flux.sample.guidance_scale == 3.5
    assert flux.model.gradient_checkpointing and flux.model.dtype == "bf16" and flux.model.max_sequence_length == 512
    assert tuple(flux.lora.target_modules) == DEFAULT_LORA_TARGETS["flux"]
    assert len(flux.tasks) == 3 and {t.teacher for t in flux.tasks.values()} == set(flux.teachers)
    assert all(t.subfolder for t in flux.teachers.values())  # Hub repo + subfolder, or a folder
    assert (flux.teachers.ocr.path, flux.teachers.ocr.subfolder) == ("/ckpt/flux_ocr", "lora")
    geo, ref = derived_geometry(flux, 8), derived_geometry(mopd, 8)
    same = lambda g: {k: v for k, v in g.items() if "forwards" not in k and "trained" not in k}  # noqa: E731
    assert same(geo) == same(ref)
    # no uncond rows: 3 tasks x 3 images x 10 steps student, 3 x 3 x 10 teacher forwards (every
    # step trained: test_a_recipe_leaves_untrained_only_steps_with_nothing_left_to_denoise)
    assert geo["trained_steps_per_image"] == "10 of 10" and ref["trained_steps_per_image"] == "9 of 10"
    assert geo["student_forwards_per_round_per_process"] == 90 and geo["teacher_forwards_per_round_per_process"] == 90
    large = load_config(f"{OPD}:sd35_large_mopd", [f"data_root={data_root}"])
    assert large.model.path == "stabilityai/stable-diffusion-3.5-large" and large.model.gradient_checkpointing
    assert tuple(large.lora.target_modules) == DEFAULT_LORA_TARGETS["sd3"]
    assert derived_geometry(large, 8) == derived_geometry(mopd, 8)
    assert {n: t.guidance_scale for n, t in large.teachers.items()} == {"geneval": 1.0, "ocr": 4.5, "aesthetic": 4.5}


def test_shipped_configs_load_by_name_from_any_folder(tmp_path, monkeypatch):
    """``--config opd:NAME`` is the file config/opd.py (a wheel ships it as diffusion_opd.named_configs)."""
    by_path = to_dict(load_config(os.path.join(ROOT, "config", "opd.py") + ":tiny_mopd"))
    monkeypatch.chdir(tmp_path)  # not the clone: no config/ here
    assert to_dict(load_config("opd:tiny_mopd")) == to_dict(load_config("opd.py:tiny_mopd")) == by_path
    with pytest.raises(ConfigError, match=r"file 'nope' not found \(a file path, or a shipped config: .*grpo.*opd"):
        load_config("nope:x")


@pytest.mark.parametrize("name, path, family, resolution, frames, guidance", [
    ("qwen_image_mopd", "Qwen/Qwen-Image", "qwen_image", 1328, 0, 4.0),
    ("flux2_mopd", "black-forest-labs/FLUX.2-dev", "flux2", 1024, 0, 2.5),
    ("wan_t2v_mopd", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "wan", 480, 81, 5.0),
    ("wan22_t2v_mopd", "Wan-AI/Wan2.2-T2V-A14B-Diffusers", "wan", 480, 81, 4.0),
])
def test_newer_family_recipes(data_root, name, path, family, resolution, frames, guidance):
    """The recipe on Qwen-Image / FLUX.2-dev / Wan 2.1 T2V: the geometry of each model card, the
    family's LoRA targets, bf16 + checkpointing, three user-given teachers; valid as shipped."""
    from diffusion_opd.models.specs import DEFAULT_LORA_TARGETS

    c = load_config(f"{OPD}:{name}", [f"data_root={data_root}"])
    validate_config(c, world_size=8)
    assert (c.model.path, c.sample.resolution, c.sample.num_frames, c.sample.guidance_scale) == \
        (path, resolution, frames, guidance)
    assert tuple(c.lora.target_modules) == DEFAULT_LORA_TARGETS[family] and c.model.dtype == "bf16"
    assert c.model.gradient_checkpointing and len(c.tasks) == 3 and {t.teacher for t in c.tasks.values()} == set(c.teachers)
    assert c.model.guidance == ("embedded" if family == "flux2" else "auto")
    # the video recipe's aesthetic task samples the built-in motion prompts (no download)
    assert (c.tasks.aesthetic.prompts == "video_motion") == (family == "wan")
    # Wan 2.2 A14B: the card's CFG of the low-noise expert
    assert c.model.guidance_scale_2 == (3.0 if name == "wan22_t2v_mopd" else 0)


# Each large recipe's schedule as its released folder's scheduler builds it (Wan 2.1's folders ship
# UniPC with flow sigmas; the tiny models' schedulers mirror the others' configs).
_WAN21_SCHEDULER = dict(_class_name="UniPCMultistepScheduler", flow_shift=3.0, use_flow_sigmas=True,
                        prediction_type="flow_prediction")


def _recipe_sigmas(c):
    import math

    import diffusers
    import numpy as np
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    from diffusion_opd.models import tiny
    from diffusion_opd.sampling import flux_sigmas, sd3_sigmas

    n, tokens, path = c.sample.num_steps, (c.sample.resolution // 16) ** 2, c.model.path.lower()
    ramp = np.linspace(1.0, 1 / n, n)
    if "qwen" in path:
        s = diffusers.FlowMatchEulerDiscreteScheduler(**tiny.QWEN_IMAGE_SCHEDULER_CONFIG)
        s.set_timesteps(sigmas=ramp, mu=calculate_shift(tokens, 256, 8192, 0.5, 0.9))
        return s.sigmas.tolist()
    if "flux.2" in path:
        s = diffusers.FlowMatchEulerDiscreteScheduler(**tiny.FLUX2_SCHEDULER_CONFIG)
        s.set_timesteps(sigmas=ramp, mu=compute_empirical_mu(tokens, n))
        return s.sigmas.tolist()
    if "flux" in path:
        return flux_sigmas(n, tokens).tolist()
    if "wan" in path:  # Wan 2.2 A14B: flow shift 12 (the Wan team's t2v_A14B config, as the tiny model)
        shift = tiny.WAN22_SCHEDULER_CONFIG["shift"] if "wan2.2" in path else _WAN21_SCHEDULER["flow_shift"]
        s = diffusers.UniPCMultistepScheduler(**{k: v for k, v in _WAN21_SCHEDULER.items() if k != "_class_name"}
                                              | {"flow_shift": shift})
        s.set_timesteps(n)
        return s.sigmas.tolist()
    return sd3_sigmas(n, c.sample.shift or 3.0).tolist()


@pytest.mark.parametrize("name", ["mopd", "sd35_large_mopd", "flux_mopd", "flux2_mopd", "qwen_image_mopd",
                                  "wan_t2v_mopd", "wan22_t2v_mopd"])
def test_a_recipe_leaves_untrained_only_steps_with_nothing_left_to_denoise(name):
    """train.num_train_steps < sample.num_steps leaves the last steps to an unmatched student: only
    where the schedule has reached sigma < 0.05 there (SD3 ends at 0.009, Qwen-Image at 0.02; FLUX.1,
    FLUX.2 and Wan end at 0.17-0.52 and train every step)."""
    c = load_config(os.path.join(ROOT, "config", "opd.py") + f":{name}", [])
    sigmas = _recipe_sigmas(c)
    assert len(sigmas) == c.sample.num_steps + 1 and sigmas[-1] == 0
    assert sigmas[c.train.num_train_steps] < 0.05, (name, [round(s, 3) for s in sigmas])
