"""Collect what tools/gpu_check.sh produced into report.json and report.md:
``python tools/gpu_check_report.py --out DIR [--mode run|dry]``.

Reads ``steps.jsonl`` (each step's exit status and time), ``environment.log``,
``tests.xml`` (pytest's JUnit report) and ``benchmarks.jsonl`` (one
tools/benchmark_train.py line per model shape). Exits 1, naming what failed, when
a step failed, a test failed (or, on a GPU, was skipped), a benchmark left no result
row or a result line is not JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def _lines(path: Path) -> list[dict]:
    """The JSON objects of a JSON-lines file (none when it is missing)."""
    return _parse(path)[0]


def _parse(path: Path) -> tuple[list[dict], list[str]]:
    """The JSON objects of a JSON-lines file, and one note per line that is not one."""
    if not path.is_file():
        return [], []
    rows, bad = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad.append(f"{path.name} line {number} is not a JSON object: {line.strip()[:120]!r}")
    return rows, bad


def failures(report: dict, bad_lines: list[str], sizes: list[str] | None,
             tests_recorded: bool) -> list[str]:
    """Everything that makes the check fail, each naming its step, test or row.

    A step with a non-zero status; a failed test (in run mode also a skipped one, or
    none at all: on a GPU every test must run); a benchmark step or expected size
    without its result row (``label`` ``qwen2.5-SIZE``); a result line that is not JSON.
    """
    steps = report["steps"]
    failed = [s["step"] + (f" ({s['note']})" if s.get("note") else f" (rc {s['rc']})")
              for s in steps if s.get("rc") != 0]
    if not steps:
        failed.append("steps.jsonl: no step recorded")
    failed += [t["test"] for t in report["tests"] if t["outcome"] == "failed"]
    ran_tests = any(s["step"] == "tests" for s in steps)
    if ran_tests and not tests_recorded:
        failed.append("tests: no tests.xml (pytest did not report)")
    if report["mode"] == "run" and ran_tests:
        failed += [f"{t['test']} (skipped on the GPU)" for t in report["tests"]
                   if t["outcome"] == "skipped"]
        if tests_recorded and not report["tests"]:
            failed.append("tests: none collected")
    failed += bad_lines
    labels = [b.get("label") for b in report["benchmarks"]]
    expected = [s["step"].removeprefix("benchmark-") for s in steps
                if s["step"].startswith("benchmark-")]
    expected += [size for size in sizes or [] if size not in expected]
    for size in expected:
        found = labels.count(f"qwen2.5-{size}")
        if found != 1:
            failed.append(f"benchmark-{size}: {found} result rows in benchmarks.jsonl, not 1")
    return failed


def _tests(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    found = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped":
                outcome = "skipped"
        found.append({"test": case.get("name"), "outcome": outcome,
                      "seconds": float(case.get("time") or 0)})
    return found


def _environment(path: Path) -> dict:
    for row in reversed(_lines(path)):
        return row
    return {}


def _number(value: object, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def markdown(report: dict) -> str:
    """The report as a Markdown page."""
    env = report["environment"]
    lines = [
        f"# megarm GPU check ({report['mode']})", "",
        f"- GPU: {env.get('gpu') or 'none (CPU dry run)'}; torch {env.get('torch')}, CUDA "
        f"{env.get('cuda')}, Python {env.get('python')}, megatron-core {env.get('megatron_core')}",
        "- SDPA kernel (bf16): " + (", ".join(f"{k} {v}" for k, v in env["attention"].items())
                                    if isinstance(env.get("attention"), dict) else "-"),
        f"- pairs: {report.get('data', {}).get('source', '?')} ({report.get('data', {}).get('pairs', '?')})",
        "- steps: " + ", ".join(f"{s['step']} {'ok' if s['rc'] == 0 else 'FAILED'} ({s['seconds']} s)"
                                  for s in report["steps"]),
        *([f"- **FAILED**: {'; '.join(report['failed'])}"] if report.get("failed") else []),
        "", "## Tests (pytest -m gpu)", "", "| test | outcome | s |", "| --- | --- | --- |",
    ]
    lines += [f"| {t['test']} | {t['outcome']} | {t['seconds']:.1f} |" for t in report["tests"]]
    lines += [
        "", "## Training throughput (one GPU, bf16, THD-packed real pairs)", "",
        "| shape | params/GPU | stream tokens | tokens/s | TFLOP/s | MFU | peak allocated GiB "
        "| peak reserved GiB | estimate GiB | allocated/estimate |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for b in report["benchmarks"]:
        est, peak = b.get("estimate_gib"), b.get("peak_memory_gib")
        cells = [
            b.get("label"),
            f"{b['parameters'] / 1e6:,.0f}M" if b.get("parameters") else "-",
            _number(b.get("stream_tokens"), ",.0f"),
            _number(b.get("tokens_per_s"), ",.0f"),
            _number(b.get("tflops_per_device"), ".1f"),
            _number(b.get("mfu"), ".1%"),
            _number(peak, ".2f"),
            _number(b.get("peak_reserved_gib"), ".2f"),
            _number(est, ".2f"),
            f"{peak / est:.2f}" if est and peak else "-",
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the directory gpu_check.sh wrote")
    parser.add_argument("--mode", default="run", help="run (a GPU) or dry (CPU)")
    parser.add_argument("--sizes", default=None,
                        help="space-separated model sizes whose result rows must be there")
    args = parser.parse_args(argv)
    out = Path(args.out)
    benchmarks, bad = _parse(out / "benchmarks.jsonl")
    data = _lines(out / "data.json")
    report = {
        "mode": args.mode,
        "environment": _environment(out / "environment.log"),
        "data": data[0] if data else {},
        "steps": _lines(out / "steps.jsonl"),
        "tests": _tests(out / "tests.xml"),
        "benchmarks": benchmarks,
    }
    sizes = args.sizes.split() if args.sizes is not None else None
    failed = failures(report, bad, sizes, (out / "tests.xml").is_file())
    report["failed"] = failed
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(markdown(report))
    print(markdown(report))
    print(f"gpu_check: {'all passed' if not failed else 'FAILED: ' + ', '.join(failed)}; "
          f"report in {out}/report.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
