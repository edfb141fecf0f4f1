"""PhaseTimer charges nested time to the innermost phase; MetricsLog truncates on resume."""
import json
import time

import torch

from diffusion_opd.trainers.metrics import MetricsLog, PhaseTimer, read_metrics


def test_phase_timer_is_exclusive():
    timer = PhaseTimer(torch.device("cpu"))
    start = time.perf_counter()
    with timer("rollout"):
        time.sleep(0.02)
        with timer("teacher"):
            time.sleep(0.1)
        time.sleep(0.02)
    total = time.perf_counter() - start
    s = timer.reset()
    assert 0.1 <= s["teacher"] < 0.1 + 0.05  # sleep overshoot only
    # the outer phase gets its own 0.04 s only; had it included the inner one it would be >= 0.14
    assert 0.04 <= s["rollout"] < 0.04 + 0.05
    assert abs(s["rollout"] + s["teacher"] - total) < 1e-3
    assert timer.reset() == {}


def test_metrics_log_truncates_rows_after_the_resumed_round(tmp_path):
    log = MetricsLog(str(tmp_path), is_main=True)
    for r in range(1, 5):
        log.log({"round": r, "loss": float(r), "bad": float("nan")})
    log.truncate_after(2)
    rows = read_metrics(str(tmp_path))
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[0]["bad"] is None  # valid JSON even for non-finite values (null, diffusion_opd/files.py)
    json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])


def test_phase_timer_synchronises_cuda_only_when_enabled(monkeypatch):
    """logging.phase_times off (the default): no CUDA sync at phase boundaries and nothing
    timed; on: one sync at each end of every phase. Counted on a fake cuda device (no GPU needed)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append(a))
    for enabled, syncs in ((False, 0), (True, 6)):
        calls.clear()
        timer = PhaseTimer(torch.device("cuda"), enabled=enabled)
        with timer("rollout"):
            with timer("teacher"):
                pass
            with timer("backward"):
                pass
        assert len(calls) == syncs
        assert set(timer.reset()) == ({"rollout", "teacher", "backward"} if enabled else set())


def test_benchmark_phase_profile_is_the_phase_timer_with_exclusive_flops():
    """scripts/benchmarking.py's PhaseProfile keeps PhaseTimer's exclusive seconds and also
    charges FLOPs to the innermost phase: a 2 n^3 matmul inside `teacher` is not `rollout`'s."""
    import os
    import sys

    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "scripts"))
    from benchmarking import PhaseProfile

    timer, a = PhaseProfile(torch.device("cpu")), torch.ones(8, 8)
    assert isinstance(timer, PhaseTimer)
    with FlopCounterMode(display=False) as counter:
        a @ a  # the counter's first op pays its set-up (about a second): before any phase
        timer.counter = counter
        with timer("rollout"):
            a @ a  # 2 * 8^3 = 1024 FLOPs
            with timer("teacher"):
                a @ a
                a @ a
                time.sleep(0.05)
    assert timer.flops == {"rollout": 1024, "teacher": 2048}
    seconds = timer.reset()
    assert seconds["teacher"] >= 0.05 > seconds["rollout"]  # the sleep is the inner phase's only
    assert timer.flops == {} and timer.reset() == {}
