"""scripts/benchmark.py on the tiny model (CPU): the JSON it writes has every field, with sane
values, and the FLOP counts follow the round's structure. No timing is asserted (shared CPUs)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "benchmark.py")
PHASES = {"rollout", "teacher", "backward", "optimizer"}


def _run(tmp, *args) -> dict:
    out = os.path.join(tmp, "bench.json")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, SCRIPT, "--model", "tiny", "--device", "cpu", "--output", out, "--warmup", "1",
           "--rounds", "1", "--cpu-threads", "1", "--workdir", os.path.join(tmp, "models"), *args]
    proc = subprocess.run(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=900)  # a bound for a hung run, not a timing claim (shared CPUs)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "variant" in proc.stdout and "MFU %" in proc.stdout  # the table was printed
    with open(out) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    """Five fp32 variants in one process (one interpreter start instead of six)."""
    return _run(str(tmp_path_factory.mktemp("bench")), "--in-process", "--variants",
                "fused,two_pass,one_teacher,lockstep,merge_teachers")


def test_json_has_every_field_with_sane_values(result):
    for key in ("device", "device_name", "torch", "diffusers", "date", "model", "rounds", "warmup"):
        assert result[key], key
    assert result["device"] == "cpu" and result["model"] == "tiny"
    rows = {r["variant"]: r for r in result["variants"]}
    assert set(rows) == {"fused", "two_pass", "one_teacher", "lockstep", "merge_teachers"}
    for name, row in rows.items():
        assert row["status"] == "ok", row
        assert row["torch_threads"] == 1
        geometry = row["geometry"]
        assert geometry["images_per_round"] == 9 and geometry["num_steps"] == 10 and geometry["trained_steps"] == 9
        assert sorted(geometry["teacher_guidance"].values()) == [1.0, 4.5, 4.5]
        sec = row["seconds_per_round"]
        assert len(sec["values"]) == 1 and sec["mean"] > 0 and sec["std"] == 0.0  # one timed round
        assert row["images_per_second"] == pytest.approx(9 / sec["mean"])
        assert set(row["phases_seconds"]) == PHASES and all(v > 0 for v in row["phases_seconds"].values())
        # exclusive phases: together they cannot exceed the round they were timed in
        assert sum(row["phases_seconds"].values()) <= sec["mean"] * 1.001
        assert row["flops_per_round"] > 0 and row["matmul_peak_flops"] > 0
        assert 0 < row["mfu"] <= 1
        assert row["mfu"] == pytest.approx(row["flops_per_round"] / (sec["mean"] * row["matmul_peak_flops"]))
        assert row["peak_memory_gb"] > 0 and row["memory_kind"] == "process peak RSS"
        assert row["matmul_peak_dtype"] == "float32"
        assert row["param_bytes"]["backbone"] > 0 and row["param_bytes"]["student"] > 0
        assert row["nonfinite_rounds"] == 0


def test_flop_counts_follow_the_round_structure(result):
    """FLOP counts are exact (deterministic), so the structure can be checked exactly:
    two_pass = fused + one student CFG forward per trained step (27 per round), teacher and
    backward FLOPs unchanged; the phase FLOPs add up to the round's."""
    rows = {r["variant"]: r for r in result["variants"]}
    fused, two = rows["fused"]["flops_by_phase"], rows["two_pass"]["flops_by_phase"]
    for row in rows.values():
        assert sum(row["flops_by_phase"].values()) == row["flops_per_round"]
    assert two["teacher"] == fused["teacher"] and two["backward"] == fused["backward"]
    # fused rollout: 3 tasks x 10 student CFG forwards; two_pass replays 3 x 9 of them
    per_forward = fused["rollout"] / 30
    assert two["rollout"] - fused["rollout"] == pytest.approx(27 * per_forward, rel=1e-9)
    # teachers: 9 steps x (3 rows at CFG 1.0 + 6 + 6 rows at CFG 4.5) = 22.5 forwards of 6 rows
    assert fused["teacher"] == pytest.approx(22.5 * per_forward, rel=1e-9)
    assert rows["one_teacher"]["flops_per_round"] == rows["fused"]["flops_per_round"]
    # lockstep batches the same rows differently: the same FLOPs, phase by phase
    assert rows["lockstep"]["flops_by_phase"] == fused
    # merged teachers skip the teachers' LoRA branch: only the teacher phase loses FLOPs
    merged = rows["merge_teachers"]["flops_by_phase"]
    assert merged["teacher"] < fused["teacher"] and {k: v for k, v in merged.items() if k != "teacher"} == \
        {k: v for k, v in fused.items() if k != "teacher"}


def test_expected_flops_from_the_architecture_match_the_counted_round(result):
    """The meta-device prediction (what docs/benchmarks.md quotes for SD3.5-M) reproduces the
    tiny round's counted FLOPs exactly, phase by phase: the composition it uses is the trainer's."""
    sys.path.insert(0, os.path.dirname(SCRIPT))
    from benchmarking import expected_round_flops

    rows = {r["variant"]: r for r in result["variants"]}
    expected = expected_round_flops("tiny")
    assert result["expected_flops"] == expected
    assert expected["fused_phases"] == rows["fused"]["flops_by_phase"]
    assert expected["fused"] == rows["fused"]["flops_per_round"]
    assert expected["two_pass"] == rows["two_pass"]["flops_per_round"]


def test_teacher_adapter_bytes(result):
    """Three adapters of one rank on the same modules: exactly three times one adapter."""
    rows = {r["variant"]: r for r in result["variants"]}
    assert sorted(rows["fused"]["teachers_loaded"]) == ["aesthetic", "geneval", "ocr"]
    assert len(rows["one_teacher"]["teachers_loaded"]) == 1
    assert rows["fused"]["param_bytes"]["teachers"] == 3 * rows["one_teacher"]["param_bytes"]["teachers"] > 0
    # the teacher fast path holds one merged weight per adapted layer and teacher: less than a
    # backbone copy each (the layers outside attention are shared), more than the adapters
    merged = rows["merge_teachers"]["param_bytes"]["teachers"]
    assert rows["fused"]["param_bytes"]["teachers"] < merged < 3 * rows["fused"]["param_bytes"]["backbone"]
    assert merged % 3 == 0


def test_one_process_per_variant_with_another_dtype(tmp_path):
    """The default isolation (a worker process per variant), here for a half-precision row."""
    result = _run(str(tmp_path), "--variants", "bf16")
    (row,) = result["variants"]
    assert result["isolation"] == "one process per variant"
    assert row["status"] == "ok" and row["settings"]["dtype"] == "bf16"
    assert row["matmul_peak_dtype"] == "bfloat16" and 0 < row["mfu"] <= 1
    # the backbone and the teachers are stored in bf16: 2 bytes a parameter, the fp32 student 4
    assert row["param_bytes"]["backbone"] % 2 == 0 and row["param_bytes"]["student"] % 4 == 0


def test_bad_arguments_fail_before_any_work(capsys):
    """Unknown variants are named with the valid ones; impossible combinations are refused."""
    spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    cases = [
        (["--variants", "fused,warp_speed"], ["warp_speed", "two_pass"]),
        (["--model", "sd3.5-medium", "--device", "cpu"], ["--device cuda"]),
        (["--in-process", "--variants", "fused,fp16"], ["fp16", "fp32"]),
        (["--rounds", "0"], ["--rounds"]),
    ]
    for args, words in cases:
        with pytest.raises(SystemExit) as exc:
            script.parse_args(["--output", "x.json", *args])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert all(w in err for w in words), (args, err)


def test_gpu_bench_fails_fast_with_exit_3_when_packages_are_missing(tmp_path):
    """The one GPU command's first step: without the carried packages (here: a Python that sees
    no site-packages) it stops within seconds with exit 3, says why in log.txt, and starts no
    variant, so a rerun still fits the lent machine's time."""
    import time

    python = tmp_path / "python-without-packages"
    python.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    python.chmod(0o755)
    out = tmp_path / "out"
    start = time.monotonic()
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_bench.sh"), str(out)],
                          env={**os.environ, "PY": str(python), "MODEL": "tiny", "DEVICE": "cpu"},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert proc.returncode == 3, proc.stdout
    assert time.monotonic() - start < 60
    log = (out / "log.txt").read_text()
    assert "not ready: torch: cannot be imported" in log and "check failed (exit 3)" in log
    assert sorted(p.name for p in out.iterdir()) == ["log.txt"]  # no row, no prepare
