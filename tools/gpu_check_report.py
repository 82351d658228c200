"""Collect what tools/gpu_check.sh produced into report.json and report.md:
``python tools/gpu_check_report.py --out DIR [--mode run|dry]``.

Reads ``steps.jsonl`` (each step's exit status and time), ``environment.log``,
``tests.xml`` (pytest's JUnit report) and ``benchmarks.jsonl`` (one
tools/benchmark_train.py line per model shape). Exits 1 when a step failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def _lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


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


def markdown(report: dict) -> str:
    """The report as a Markdown page."""
    env = report["environment"]
    lines = [
        f"# megarm GPU check ({report['mode']})", "",
        f"- GPU: {env.get('gpu') or 'none (CPU dry run)'}; torch {env.get('torch')}, CUDA "
        f"{env.get('cuda')}, Python {env.get('python')}, megatron-core {env.get('megatron_core')}",
        "- steps: " + ", ".join(f"{s['step']} {'ok' if s['rc'] == 0 else 'FAILED'} ({s['seconds']} s)"
                                  for s in report["steps"]),
        "", "## Tests (pytest -m gpu)", "", "| test | outcome | s |", "| --- | --- | --- |",
    ]
    lines += [f"| {t['test']} | {t['outcome']} | {t['seconds']:.1f} |" for t in report["tests"]]
    lines += [
        "", "## Training throughput (one GPU, bf16, THD-packed real pairs)", "",
        "| shape | params/GPU | tokens/s | TFLOP/s | MFU | peak memory GiB | estimate GiB | peak/estimate |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for b in report["benchmarks"]:
        est = b.get("estimate_gib")
        ratio = f"{b['peak_memory_gib'] / est:.2f}" if est and b.get("peak_memory_gib") else "-"
        mfu = f"{b['mfu']:.1%}" if b.get("mfu") is not None else "-"
        lines.append(
            f"| {b.get('label')} | {b.get('parameters', 0) / 1e6:,.0f}M | {b['tokens_per_s']:,.0f} | "
            f"{b['tflops_per_device']:.1f} | {mfu} | {b['peak_memory_gib']:.2f} | "
            f"{est:.2f} | {ratio} |" if est else
            f"| {b.get('label')} | - | {b['tokens_per_s']:,.0f} | {b['tflops_per_device']:.1f} | {mfu} | "
            f"{b['peak_memory_gib']:.2f} | - | - |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the directory gpu_check.sh wrote")
    parser.add_argument("--mode", default="run", help="run (a GPU) or dry (CPU)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    report = {
        "mode": args.mode,
        "environment": _environment(out / "environment.log"),
        "steps": _lines(out / "steps.jsonl"),
        "tests": _tests(out / "tests.xml"),
        "benchmarks": _lines(out / "benchmarks.jsonl"),
    }
    failed = [s["step"] for s in report["steps"] if s["rc"] != 0]
    failed += [t["test"] for t in report["tests"] if t["outcome"] == "failed"]
    report["failed"] = failed
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(markdown(report))
    print(markdown(report))
    print(f"gpu_check: {'all passed' if not failed else 'FAILED: ' + ', '.join(failed)}; "
          f"report in {out}/report.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
