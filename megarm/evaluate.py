"""Benchmark-format evaluation of a reward model on local files.

    torchrun --nproc_per_node N -m megarm.evaluate --load CKPT_OR_EXPORT --data FILE \\
        --output results.json [--format auto|rewardbench|rewardbench2|rmbench|pairs]

Formats (jsonl, json or parquet: ``rewardbench``, ``rewardbench2``, ``rmbench``,
``pairs``), each scored as the benchmark's own code scores it; the rules are in
:mod:`megarm.rewards.benchmarks`. ``--format labelled`` evaluates a multi-attribute
(regression) model on a labelled file: RMSE and Pearson per attribute
(:func:`megarm.rewards.attributes.evaluate_labelled`); on pair files such a model
is scored by its ``--attribute-weights`` scalar.

With ``--critique-model`` (a critique model's HF causal-LM export) every response
first gets a critique written by it, and the reward is read at the end of prompt +
response + critique turn + critique, as the model was trained.

Every record is scored or listed under ``skipped`` with the reason. The output is a
JSON file (metrics, every record's scores, the skipped records) and a markdown table
(``<output>.md``, also printed). Training can run the same evaluation every
``eval_interval`` iterations (:class:`megarm.rewards.benchmarks.BenchmarkEvaluator`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megarm import cli
from megarm.errors import ScoringError
from megarm.rewards import benchmarks
from megarm.rewards.attributes import evaluate_labelled
from megarm.rewards.backends import open_scorer
from megarm.rewards.benchmarks import (  # noqa: F401  (flatten, evaluate: the library's, re-exported)
    FORMATS,
    EvaluateError,
    evaluate,
    flatten,
    markdown,
)

# --------------------------------------------------------------------------- command line


def format_help() -> str:
    """The benchmark-file formats, as :mod:`megarm.rewards.benchmarks` documents them
    (one text for the docs and ``--help``)."""
    doc = benchmarks.__doc__ or ""
    start = doc.index("Formats")
    end = doc.index("With ``--critique-model``")
    text = doc[start:end].strip().replace("``", "")
    return text + "\n\nEach result line keeps the record's index and, when it has one, its id."


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="python -m megarm.evaluate", description=__doc__.split("\n")[0],
        epilog=format_help(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cli.add_model_arguments(p)
    cli.add_critique_arguments(p)
    p.add_argument("--data", required=True, help="benchmark file (jsonl, json or parquet)")
    p.add_argument(
        "--format", default="auto", choices=(*FORMATS, "labelled"),
        help="record format; labelled: per-attribute RMSE/Pearson of a regression model",
    )
    p.add_argument(
        "--handler-name", default=None,
        help="handler for --format pairs (default pairwise_messages) or labelled "
        "(default regression; helpsteer2)",
    )
    p.add_argument("--output", required=True, help="results JSON (markdown beside it: .md)")
    return p


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Evaluate; rank 0 writes the outputs and returns the result."""
    output = Path(args.output)
    table = output.with_suffix(".md")
    if table == output:
        raise EvaluateError(
            f"--output {output}: the markdown table goes to <output>.md, which would replace "
            "the results; name the results .json"
        )
    inputs = [Path(args.data)]
    cli.check_output("--output", output, inputs)
    cli.check_output("--output", table, inputs)
    scorer, encoder, info = open_scorer(cli.scorer_spec(args))
    with scorer:
        if not scorer.is_driver:
            scorer.follow()
            return None
        if args.format == "labelled":
            result = evaluate_labelled(args.data, encoder, scorer.outputs, scorer.label_names,
                                       args.handler_name or "regression")
        else:
            critic = cli.open_critic(args, info, encoder)
            result = evaluate(args.data, args.format, encoder, scorer.rewards,
                              args.handler_name or "pairwise_messages", critic)
    result["model"] = str(args.load)
    text = markdown(result["format"], result["metrics"], result["scored"], len(result["skipped"]))
    # A metric with nothing to average is NaN; JSON has no NaN: it is written as null.
    _write(output, json.dumps(_finite(result), indent=2, allow_nan=False) + "\n")
    _write(table, text)
    print(text, end="", flush=True)
    if result["skipped"]:
        print(f"skipped {len(result['skipped'])} records (reasons in {output})", flush=True)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a bad input)."""
    return cli.run_command(build_parser(), run, argv, (ScoringError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
