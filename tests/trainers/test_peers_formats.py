"""What the peers' tools expect of our runs: PEFT-format checkpoint copies that
``PeftModel.from_pretrained`` loads, and a student that starts from an existing LoRA."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from diffusion_opd.config import ConfigError, load_config
from diffusion_opd.models.base import STUDENT
from diffusion_opd.trainers.opd import train
from diffusion_opd.trainers.run import Run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "config", "opd.py") + ":tiny_mopd"


def tiny(out, *overrides, config=TINY):
    return load_config(config, [f"output_dir={out}", "logging.progress=false", "eval.every=0", *overrides])


def _finished(tmp_path_factory, config):
    out = tmp_path_factory.mktemp("peers") / "run"
    run = train(tiny(out, "train.num_rounds=2", "save_every=2", "train.ema_decay=0.5", config=config))
    return run, os.path.join(out, "checkpoints", "round-2")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """Two rounds of tiny_mopd with an EMA; the round-2 checkpoint."""
    return _finished(tmp_path_factory, TINY)


@pytest.fixture(scope="module")
def finished_wan22_run(tmp_path_factory):
    """The same on Wan 2.2 A14B's two experts (tiny_wan22_t2v_mopd: one adapter per expert, 5-frame videos)."""
    return _finished(tmp_path_factory, TINY.replace(":tiny_mopd", ":tiny_wan22_t2v_mopd"))


def _inputs(policy, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, *policy.latent_shape(64), generator=g)
    embeds = policy.encode_prompts(["a red cup", "a sign that says hi"][:n])
    return latents, 0.6, embeds


def _peft_velocity(model_dir, adapter_dir, latents, sigma, embeds):
    from diffusers import SD3Transformer2DModel
    from peft import PeftModel

    base = SD3Transformer2DModel.from_pretrained(model_dir, subfolder="transformer")
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        return model(hidden_states=latents, timestep=torch.full((len(latents),), sigma * 1000.0),
                     encoder_hidden_states=embeds.cond["prompt_embeds"],
                     pooled_projections=embeds.cond["pooled_prompt_embeds"], return_dict=False)[0]


def test_peft_from_pretrained_gives_the_students_velocities(finished_run):
    run, ckpt = finished_run
    policy = run.policy
    for folder in ("lora", "ema/lora"):
        assert sorted(os.listdir(os.path.join(ckpt, folder))) == ["adapter_config.json", "adapter_model.safetensors"]
    latents, sigma, embeds = _inputs(policy)
    with torch.no_grad():
        student = policy.velocity(latents, sigma, embeds, STUDENT)
        with run.ema.swapped_in():
            ema = policy.velocity(latents, sigma, embeds, STUDENT)
    assert (student - ema).abs().max() > 1e-4  # two different weight sets: the comparison below means something
    for folder, expected in (("lora", student), ("ema/lora", ema)):
        got = _peft_velocity(policy.model_dir, os.path.join(ckpt, folder), latents, sigma, embeds)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["peft", "diffusers"])
def test_student_init_starts_from_that_adapter_exactly(finished_run, tmp_path, layout):
    _, ckpt = finished_run
    saved = load_file(os.path.join(ckpt, "student_raw.safetensors"))
    source = os.path.join(ckpt, "lora") if layout == "peft" else ckpt  # round-N/ holds the diffusers file
    run = Run(tiny(tmp_path / "cont", f"model.student_init={source}"))
    state = run.policy.student_state_dict()
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[k], saved[k]) for k in saved)


def test_student_init_takes_rank_alpha_targets_from_the_adapter(finished_run, tmp_path):
    run, _ = finished_run
    teacher = os.path.join(os.path.dirname(run.config.output_dir), "run", "builtin", "teacher-1")
    # teacher-1: PEFT, rank 8, alpha 16, q/k/v/out only (tiny_mopd's student: rank 8, alpha 8, 8 targets)
    started = Run(tiny(tmp_path / "t", f"model.student_init={teacher}", "lora.alpha=16",
                          "lora.target_modules=attn.to_q,attn.to_k,attn.to_v,attn.to_out.0"))
    cfg = started.policy.student_lora_config()
    assert (cfg.r, cfg.lora_alpha) == (8, 16)
    assert all(m.endswith(("to_q", "to_k", "to_v", "to_out.0")) for m in cfg.target_modules)
    latents, sigma, embeds = _inputs(started.policy)
    with torch.no_grad():  # the student IS that adapter: same velocity as the teacher built from it
        torch.testing.assert_close(started.policy.velocity(latents, sigma, embeds, STUDENT),
                                   started.policy.velocity(latents, sigma, embeds, "teacher_a"), rtol=0, atol=0)
    # tiny_mopd sets lora.alpha=8: a setting that contradicts the adapter is a config error ...
    with pytest.raises(ConfigError, match=r"lora.alpha: conflicts with model.student_init .*alpha 16"):
        Run(tiny(tmp_path / "c1", f"model.student_init={teacher}"))
    with pytest.raises(ConfigError, match=r"lora.target_modules: .*adapter adapts \['attn.to_k', 'attn.to_out.0'"):
        Run(tiny(tmp_path / "c0", f"model.student_init={teacher}", "lora.alpha=16", "lora.target_modules=attn.to_q"))
    with pytest.raises(ConfigError, match="lora.init: .*no effect with model.student_init"):
        Run(tiny(tmp_path / "c2", f"model.student_init={teacher}", "lora.init=false"))
    with pytest.raises(ConfigError, match="model.student_init: .*no LoRA weights"):
        Run(tiny(tmp_path / "c3", f"model.student_init={tmp_path}"))


# ----------------------------------------------------------------------------- scripts/export.py
def _export_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("export_script", os.path.join(ROOT, "scripts", "export.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("fmt,use_ema", [("diffusers", False), ("peft", True), ("merged", False)])
@pytest.mark.parametrize("finished", ["finished_run", pytest.param("finished_wan22_run", marks=pytest.mark.slow)])
def test_export_round_trip_reproduces_the_checkpoints_images(request, finished, tmp_path, fmt, use_ema):
    run, ckpt = request.getfixturevalue(finished)
    script = _export_script()
    out = tmp_path / fmt
    argv = [ckpt, "--format", fmt, "--out", str(out), "--num_steps", "3"] + (["--use_ema"] if use_ema else [])
    result = script.export(script.build_parser().parse_args(argv))
    if fmt == "merged":
        assert (out / "model_index.json").is_file() and (out / "transformer").is_dir()
        assert result["max_pixel_diff"] <= 8  # W + BA fused in fp32: rounding only
    else:
        assert result["max_pixel_diff"] == 0  # the same LoRA arithmetic on the same weights
        from diffusion_opd.models.lora import read_lora_adapter

        exported = read_lora_adapter(str(out)).state_dict
        if use_ema:
            with run.ema.swapped_in():
                expected = run.policy.student_state_dict()
        else:
            expected = load_file(os.path.join(ckpt, "student_raw.safetensors"))
        assert exported.keys() == expected.keys()
        assert all(torch.equal(exported[k].float(), expected[k]) for k in expected)
    # The check can fail: a tolerance below what merging costs is refused with one line.
    if fmt == "merged" and result["max_pixel_diff"] > 0:
        assert script.main([ckpt, "--format", fmt, "--out", str(tmp_path / "m2"), "--num_steps", "3",
                            "--tolerance", "0"]) == 2


def test_export_refuses_push_without_a_token_and_existing_folders(finished_run, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as hub_constants

    _, ckpt = finished_run
    script = _export_script()
    out = tmp_path / "never"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert script.main([ckpt, "--format", "peft", "--out", str(out), "--push_to_hub", "me/model"]) == 2
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err
    monkeypatch.delenv("HF_HUB_OFFLINE")
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(tmp_path / "no_token_file"))
    monkeypatch.setattr(hub_constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no_tokens_file"))
    assert script.main([ckpt, "--format", "peft", "--out", str(out), "--push_to_hub", "me/model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no Hugging Face token found" in err and "hf auth login" in err
    assert not out.exists()  # refused before any work
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("user data")
    assert script.main([ckpt, "--format", "peft", "--out", str(tmp_path / "taken")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "taken" / "mine.txt").read_text() == "user data"


def test_student_init_from_an_unreachable_hub_repo_is_one_config_error(tmp_path):
    # HF_HUB_OFFLINE=1 in the test session: the Hub id cannot be fetched; the message names the key,
    # the repo and what to do, before the backbone loads (output_dir/builtin is never built).
    with pytest.raises(ConfigError, match=r"model.student_init: could not fetch .*'quanhaol/DiffusionOPD'.*hf download"):
        Run(tiny(tmp_path / "hub", "model.student_init=quanhaol/DiffusionOPD", "model.student_init_subfolder=Student/lora"))
    assert not (tmp_path / "hub" / "builtin").exists()


def test_push_to_hub_dry_run_writes_a_model_card_naming_the_base_model(finished_run, tmp_path, capsys):
    """No token, offline: a dry run writes and checks the export and its card, uploads nothing."""
    from huggingface_hub import ModelCard

    run, ckpt = finished_run
    out = tmp_path / "card"
    script = _export_script()
    summary = tmp_path / "summary.json"  # what the eval CLI writes
    summary.write_text(json.dumps({"headline": {"ocr_accuracy": 0.625}}))
    assert script.main([ckpt, "--format", "peft", "--out", str(out), "--push_to_hub", "me/tiny-opd", "--dry_run",
                        "--num_steps", "2", "--eval_summary", str(summary)]) == 0
    assert "dry run: would push" in capsys.readouterr().out
    card = ModelCard.load(str(out / "README.md"))  # the Hub's own parser
    base = os.path.join(run.config.output_dir, "builtin", "tiny-sd3")  # the checkpoint's model.path, built
    assert card.data.base_model == base
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-to-image"
    assert {"on-policy-distillation", "lora", "sd3"} <= set(card.data.tags)
    assert 'PeftModel.from_pretrained(pipe.transformer, "me/tiny-opd")' in card.text
    assert "| objects | teacher_a |" in card.text and "| eval CLI: ocr_accuracy | 0.625 |" in card.text
    assert script.main([ckpt, "--format", "peft", "--out", str(tmp_path / "x"), "--dry_run"]) == 2


@pytest.mark.parametrize("base, video, tag", [("Qwen/Qwen-Image", False, "qwen-image"),
                                              ("black-forest-labs/FLUX.2-dev", False, "flux2"),
                                              ("Wan-AI/Wan2.2-T2V-A14B-Diffusers", True, "wan")])
def test_model_card_of_the_newer_families_names_the_family_and_loads_video_as_frames(base, video, tag):
    """A video export's card loads ``.frames`` (a Wan pipeline has no ``.images``) and says text-to-video;
    every snippet is valid Python."""
    import ast

    from huggingface_hub import ModelCard

    from diffusion_opd.model_card import model_card

    for fmt in ("diffusers", "peft", "merged"):
        card = ModelCard(model_card(base_model=base, fmt=fmt, config={}, second_expert=video, video=video))
        assert card.data.pipeline_tag == ("text-to-video" if video else "text-to-image") and tag in card.data.tags
        code = card.text.split("```python\n")[1].split("```")[0]
        ast.parse(code)
        assert (".frames[0]" in code) == video and (".images[0]" in code) == (not video)
        assert ("transformer_2" in code) == (video and fmt != "merged")
