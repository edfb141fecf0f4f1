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
    """n counts the update being made, from 1 (the peers pass their step counter after incrementing it)."""
    values = [1.0, 2.0, 4.0, 8.0] + [1.0] * 80
    expected, decays = 0.0, []
    for n, v in enumerate(values, start=1):
        d = min(0.9, (1 + n) / (10 + n))
        decays.append(d)
        expected = d * expected + (1 - d) * v
    ema = _run(True, values)
    assert ema.shadow[0][0].item() == pytest.approx(expected, rel=1e-6)
    assert decays[0] == pytest.approx(2 / 11) and decays[-1] == 0.9  # the ramp reaches decay 0.9 at n = 80
    # After one step the warmed-up shadow is 9/11 of the way to the weights; without warm-up 10%.
    assert _run(True, [1.0]).shadow[0][0].item() == pytest.approx(9 / 11)
    assert _run(False, [1.0]).shadow[0][0].item() == pytest.approx(0.1)


def test_warmup_state_round_trips():
    ema = _run(True, [1.0, 2.0])
    fresh = EMA([torch.nn.Parameter(torch.zeros(3))], 0.9, warmup=True)
    fresh.load_state_dict(ema.state_dict())
    assert fresh.current_decay() == ema.current_decay() == pytest.approx(4 / 13)


def test_old_policy_decay_reference_schedules():
    from diffusion_opd.trainers.ema import old_policy_decay

    # min(0.001 * step, 0.5): the published DiffusionNFT recipes
    assert [old_policy_decay(s) for s in (0, 1, 100, 499, 500, 10_000)] == pytest.approx([0, 0.001, 0.1, 0.499, 0.5, 0.5])
    # flat 0 for 75 steps, then 0.0075 per step up to 0.999
    sched = dict(rate=0.0075, max_decay=0.999, delay=75)
    assert [old_policy_decay(s, **sched) for s in (0, 74, 75, 175, 207, 208, 209, 1000)] == pytest.approx(
        [0, 0, 0, 0.75, 0.99, 0.9975, 0.999, 0.999])
    with pytest.raises(ValueError, match="max_decay"):
        old_policy_decay(1, max_decay=1.5)


def test_ema_update_in_place_closed_form_and_dtypes():
    from diffusion_opd.trainers.ema import ema_update_

    old = [torch.full((2,), 4.0), torch.full((3,), 1.0, dtype=torch.bfloat16)]
    new = [torch.full((2,), 8.0, requires_grad=True), torch.full((3,), 3.0)]
    ema_update_(old, new, 0.25)  # 0.25 * old + 0.75 * new
    assert old[0].tolist() == [7.0, 7.0] and old[1].tolist() == [2.5, 2.5, 2.5]
    assert old[1].dtype == torch.bfloat16 and new[0].tolist() == [8.0, 8.0] and not old[0].requires_grad
    ema_update_(old, new, 1.0)  # decay 1 keeps the old policy
    assert old[0].tolist() == [7.0, 7.0]
    ema_update_(old, new, 0.0)  # decay 0 copies the student exactly
    assert old[0].tolist() == [8.0, 8.0] and old[1].tolist() == [3.0, 3.0, 3.0]
    with pytest.raises(ValueError, match="2 target tensors but 1"):
        ema_update_(old, new[:1], 0.5)
