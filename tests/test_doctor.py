"""``python -m xlsr.doctor`` on the CPU: every check passes or is skipped with its reason, the JSON report holds it all,
a planted fault (a wrong dtype cast, an inexact resume) makes its check FAIL and the exit code 1, and ``--bench``
reports its timings."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from xlsr.doctor.checks import CHECKS, kernel_of
from xlsr.doctor.cli import checked, parse_args
from xlsr.flops import peak_bf16_tflops
from xlsr.machine import largest_batch

REPO = Path(__file__).resolve().parents[1]


def doctor(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xlsr.doctor", "--device", "cpu", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


def rows_by_name(report: dict) -> dict[str, dict]:
    return {row["name"]: row for row in report["checks"]}


@pytest.mark.slow
def test_cpu_run_passes_or_skips_with_reasons(tmp_path):
    out = tmp_path / "doctor.json"
    result = doctor("--json", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = rows_by_name(report)
    assert list(rows) == [check.name for check in CHECKS]
    for row in rows.values():
        assert row["status"] in ("PASS", "SKIP"), row
        assert row["detail"].strip(), row  # a PASS says what it found, a SKIP why
        assert row["seconds"] >= 0
    for check in CHECKS:  # what exists on CUDA alone is skipped on the CPU, and says so
        if check.cuda_only:
            assert rows[check.name]["status"] == "SKIP" and "CUDA only" in rows[check.name]["detail"]
    assert rows["forward fp32"]["status"] == "PASS" and rows["ddp step"]["detail"].startswith("gloo")
    assert report["ok"] is True and report["device"] == "cpu"
    assert report["versions"]["torch"] and report["cpu"]["torch_threads"] >= 1 and report["gpus"] == []
    for row in rows.values():  # the table printed what the JSON holds
        assert f"{row['name']:<18} {row['status']}" in result.stdout


def test_a_wrong_dtype_cast_fails_the_forward_check(tmp_path):
    out = tmp_path / "doctor.json"
    result = doctor("--only", "forward", "--inject-fault", "forward-cast", "--json", str(out))
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    rows = rows_by_name(json.loads(out.read_text()))
    assert rows["forward fp32"]["status"] == "FAIL"
    assert "float64 reference" in rows["forward fp32"]["detail"]
    assert rows["forward bf16"]["status"] == rows["forward fp16"]["status"] == "PASS"  # only the fp32 path is cast
    assert "failed: forward fp32" in result.stdout


def test_an_inexact_resume_fails_the_checkpoint_check(tmp_path):
    out = tmp_path / "doctor.json"
    result = doctor("--only", "checkpoint", "--inject-fault", "resume-drift", "--json", str(out))
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    row = rows_by_name(json.loads(out.read_text()))["checkpoint resume"]
    assert row["status"] == "FAIL" and "resumed losses" in row["detail"], row


@pytest.mark.slow
def test_bench_reports_each_workload(tmp_path):
    out = tmp_path / "doctor.json"
    result = doctor("--only", "none", "--bench", "--bench-preset", "tiny", "--json", str(out),
                    env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["checks"] == []
    assert [row["workload"] for row in report["bench"]] == ["train", "finetune"]
    for row in report["bench"]:
        assert "error" not in row, row
        assert row["batch"] == 1 and row["precision"] == "fp32" and row["step_seconds"] > 0
        assert row["audio_seconds_per_second"] == pytest.approx(row["crop_seconds"] / row["step_seconds"])
        assert 0 < row["mfu"] <= 1 and math.isclose(row["mfu"], row["model_tflops"] / row["peak_tflops"])
        assert row["peak_source"].startswith("measured") and row["peak_memory_gb"] > 0


@pytest.mark.parametrize("args, message", [
    (["--only", "forward,nothing"], "--only: no check is called nothing"),
    (["--device", "tpu"], "--device 'tpu'"),
    (["--workers", "-1"], "--workers must be 0 or more"),
    (["--compile-timeout", "-5"], "--compile-timeout must be 0 (no limit) or more"),
])
def test_bad_arguments_are_named(args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        checked(parse_args(args))


def test_bad_arguments_exit_with_code_2_and_one_line():
    result = doctor("--only", "nothing")
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [f"error: --only: no check is called nothing (checks: "
                                                  f"{', '.join(check.name for check in CHECKS)})"]


def test_helpers():
    assert largest_batch(lambda batch: batch <= 5, 8) == 5
    assert largest_batch(lambda batch: batch <= 5, 3) == 3
    assert largest_batch(lambda batch: False, 8) == 0
    # the more specific entry wins: an H100 PCIe is not an SXM H100
    assert peak_bf16_tflops("NVIDIA H100 PCIe") < peak_bf16_tflops("NVIDIA H100 80GB HBM3")
    assert peak_bf16_tflops("a GPU nobody knows") is None
    assert kernel_of(["aten._scaled_dot_product_flash_attention.default"]) == "flash"
    assert kernel_of(["aten._scaled_dot_product_efficient_attention.default"]) == "memory-efficient"
    assert kernel_of(["aten.bmm.default", "aten._softmax.default"]) == "math"
