"""absl / ml_collections ``--config.key=value`` overrides mean exactly what ``key=value`` means."""
import os

import pytest

from diffusion_opd.config import ConfigError, load_config, normalise_overrides, to_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "config", "opd.py") + ":tiny_mopd"

PLAIN = ["train.learning_rate=1e-4", "save_every=5", "model.gradient_checkpointing=true",
         "lora.target_modules=attn.to_q,attn.to_k"]


@pytest.mark.parametrize("style", ["absl_equals", "absl_two_words", "dashes"])
def test_absl_overrides_resolve_to_the_same_config(style):
    if style == "absl_equals":
        args = ["--config." + p for p in PLAIN]
    elif style == "absl_two_words":
        args = [w for p in PLAIN for w in ("--config." + p.split("=")[0], p.split("=", 1)[1])]
    else:
        args = ["--" + p for p in PLAIN]
    expected = to_dict(load_config(TINY, PLAIN))
    got = to_dict(load_config(TINY, args))
    assert got == expected
    assert got["train"]["learning_rate"] == 1e-4 and tuple(got["lora"]["target_modules"]) == ("attn.to_q", "attn.to_k")
    assert got != to_dict(load_config(TINY))  # the overrides did change something


def test_bad_absl_key_gets_the_same_hint():
    with pytest.raises(ConfigError) as plain:
        load_config(TINY, ["train.learnig_rate=1"])
    with pytest.raises(ConfigError) as absl:
        load_config(TINY, ["--config.train.learnig_rate=1"])
    assert str(absl.value) == str(plain.value)
    assert "did you mean 'train.learning_rate'" in str(absl.value)
    with pytest.raises(ConfigError, match="train.batch_size: cannot set 'two'"):
        load_config(TINY, ["--config.train.batch_size", "two"])


def test_normalise_overrides():
    assert normalise_overrides(["--config.a.b", "3", "--config.c=4", "d=5", "--e=6"]) == ["a.b=3", "c=4", "d=5", "e=6"]


def test_train_script_accepts_absl_form(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_opd_script", os.path.join(ROOT, "scripts", "train_opd.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--config", TINY, "--config.save_every", "5", "--validate_only"]) == 0
    assert "save_every: 5" in capsys.readouterr().out
    assert module.main(["--config", TINY, "--config.train.learnig_rate=1", "--validate_only"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'train.learning_rate'" in err
