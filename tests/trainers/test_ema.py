"""EMA: one update per optimizer step, the closed form with and without the warm-up ramp."""
import pytest
import torch

from diffusion_opd.trainers.ema import EMA


def _run(warmup, values, decay=0.9):
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([p], decay, warmup=warmup)
    for v in values:
        with torch.no_grad():
            p.fill_(v)
        ema.update()
    return ema


def test_no_warmup_is_the_plain_recursion():
    values = [1.0, 2.0, 4.0]
    expected = 0.0
    for v in values:
        expected = 0.9 * expected + 0.1 * v
    ema = _run(False, values)
    assert ema.shadow[0][0].item() == pytest.approx(expected, rel=1e-6)  # 0.6 + ... = 0.661
    assert ema.num_updates == 3 and ema.current_decay() == 0.9


def test_warmup_ramp_matches_min_decay_1_plus_n_over_10_plus_n():
    values = [1.0, 2.0, 4.0, 8.0] + [1.0] * 80
    expected, decays = 0.0, []
    for n, v in enumerate(values):
        d = min(0.9, (1 + n) / (10 + n))
        decays.append(d)
        expected = d * expected + (1 - d) * v
    ema = _run(True, values)
    assert ema.shadow[0][0].item() == pytest.approx(expected, rel=1e-6)
    assert decays[0] == pytest.approx(0.1) and decays[-1] == 0.9  # the ramp reaches decay 0.9 at n = 80
    # After one step the warmed-up shadow is 90% of the way to the weights; without warm-up 10%.
    assert _run(True, [1.0]).shadow[0][0].item() == pytest.approx(0.9)
    assert _run(False, [1.0]).shadow[0][0].item() == pytest.approx(0.1)


def test_warmup_state_round_trips():
    ema = _run(True, [1.0, 2.0])
    fresh = EMA([torch.nn.Parameter(torch.zeros(3))], 0.9, warmup=True)
    fresh.load_state_dict(ema.state_dict())
    assert fresh.current_decay() == ema.current_decay() == pytest.approx(3 / 12)
