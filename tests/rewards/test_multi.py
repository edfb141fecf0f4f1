"""MultiReward over two real scorers: OCR (rapidocr, offline) and UnifiedReward (against the
fake OpenAI-compatible judge of fake_judge.py on loopback)."""
import math
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from diffusion_opd.rewards import reward_weights
from diffusion_opd.rewards.multi import MultiReward

try:  # sibling test modules (tests/rewards is on sys.path under pytest's default import mode)
    from test_ocr import render_text
except ImportError:  # tests/rewards collected as a package
    from .test_ocr import render_text


def test_weighted_sum_and_namespaced_keys(judge):
    pytest.importorskip("rapidocr_onnxruntime")
    multi = MultiReward({"ocr": 2.0, "unifiedreward": 0.5}, unifiedreward={"url": judge.url, "backoff": 0.01})
    images = [render_text("Hello World"), render_text("Nothing")]
    prompts = ['a sign "Hello World"', 'a sign "Hello World" again']  # 4 and 5 words -> judge says 5, 1
    out = multi(images, prompts)
    assert set(out) == {"ocr", "ocr/recognised", "unifiedreward", "unifiedreward_raw", "total"}
    np.testing.assert_array_equal(out["unifiedreward_raw"], [5.0, 1.0])
    expected = 2.0 * out["ocr"].astype(np.float64) + 0.5 * out["unifiedreward"].astype(np.float64)
    np.testing.assert_allclose(out["total"], expected, rtol=1e-6)  # float32 rounding of the sum
    assert out["total"].dtype == np.float32 and out["total"][0] > out["total"][1]


def test_nan_policy(judge):
    pytest.importorskip("rapidocr_onnxruntime")
    images = [render_text("Hello")]
    prompts = ["no quoted text here"]  # OCR -> NaN; the judge gives 1 + 4 % 5 = 5 -> 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strict = MultiReward({"ocr": 1.0, "unifiedreward": 1.0}, unifiedreward={"url": judge.url})(images, prompts)
        lenient = MultiReward({"ocr": 1.0, "unifiedreward": 1.0}, nan_policy="ignore",
                              unifiedreward={"url": judge.url})(images, prompts)
    assert math.isnan(strict["total"][0])
    assert lenient["total"][0] == pytest.approx(1.0)


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="valid rewards"):
        MultiReward({"ocr": 1.0, "nope": 1.0})
    with pytest.raises(ValueError, match="no weight"):
        MultiReward({"ocr": 1.0}, geneval={"device": "cpu"})
    for weight in ("high", float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="must be a finite number"):
            MultiReward({"ocr": weight})
    with pytest.raises(ValueError, match="nan_policy"):
        MultiReward({"ocr": 1.0}, nan_policy="zero")


@pytest.mark.parametrize("spec,message", [
    ("brightness:1.0,brightness:2.0", "'brightness' appears twice"),  # a dict kept only the last weight
    ("brightness, brightness", "'brightness' appears twice"),
    ("brightness:nan", "must be a finite number"),  # float('nan') parses; every total would be NaN
    ("brightness:inf,colorfulness", "must be a finite number"),
    ("brightness:high", "must be a finite number"),
    (" , ", "no reward"),
])
def test_reward_spec_refusals(spec, message):
    with pytest.raises(ValueError, match=message):
        reward_weights(spec)


def test_reward_spec_weights():
    assert reward_weights("brightness") == {"brightness": 1.0}
    assert reward_weights("brightness:0.5, colorfulness:-2") == {"brightness": 0.5, "colorfulness": -2.0}
