"""The report's arithmetic (min-max Average, gain kept, claim verdicts) on hand-made results."""
import math

import pytest

from diffusion_opd.demo import report


def _results(opd, multitask, ratio=50.0, z=1.0):
    def method(kind, rewards):
        return dict(kind=kind, label=kind, seconds=1.0, images=10, guidance=1.0, rewards=dict(zip(report.TASKS, rewards)))

    return dict(methods={
        "base": method("base", (0.5, 0.2, 0.3)),
        "teacher_colour": method("teacher", (0.9, 0.2, 0.1)),
        "teacher_glyph": method("teacher", (0.4, 0.8, 0.3)),
        "teacher_aesthetic": method("teacher", (0.3, 0.2, 0.7)),
        "opd": method("opd", opd),
        "multitask": method("baseline", multitask),
    }, variance=dict(ratio=ratio, z=z, mean_diff_norm=0.1, trace_kl=1.0, trace_ppo=ratio))


def test_min_max_average_is_the_papers():
    rows = {"a": dict(colour=0.0, glyph=1.0, aesthetic=5.0), "b": dict(colour=1.0, glyph=1.0, aesthetic=7.0),
            "c": dict(colour=0.5, glyph=1.0, aesthetic=6.0)}
    avg = report.min_max_average(rows)  # glyph is equal everywhere: contributes 0
    assert avg == pytest.approx({"a": 0.0, "b": 2 / 3, "c": 1 / 3})


def test_gain_kept_and_claims():
    res = _results(opd=(0.88, 0.79, 0.69), multitask=(0.7, 0.5, 0.5))
    kept = report.gains_kept(res, "opd")
    assert kept == pytest.approx({"colour": 0.95, "glyph": 59 / 60, "aesthetic": 39 / 40})
    claims = {c["id"]: c for c in report.check_claims(res)}
    assert claims["a1"]["held"] and claims["a2_multitask"]["held"] and claims["b1"]["held"] and claims["b2"]["held"]
    res = _results(opd=(0.87, 0.79, 0.69), multitask=(0.9, 0.8, 0.7), ratio=1.5, z=4.0)
    claims = {c["id"]: c for c in report.check_claims(res)}
    assert not any(c["held"] for c in claims.values())  # 92.5% < 95%, loses to the baseline, ...
    assert "colour 92.5%" in claims["a1"]["measured"]
    res["methods"]["teacher_glyph"]["rewards"]["glyph"] = 0.2  # a teacher without gain: nothing to keep
    assert math.isnan(report.gains_kept(res, "opd")["glyph"])
    assert not {c["id"]: c for c in report.check_claims(res)}["a1"]["held"]
