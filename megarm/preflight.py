"""Preflight: the checks of the files a run names, before any process group or model
exists: the tokenizer and checkpoint directories exist, a checkpoint's tracker and
iteration resolve, a benchmark file is there, and every data prefix has its packed
files, agreeing with each other and their stats.json, fitting the sequence length
and the model's vocabulary, and holding what the objective trains on.

:func:`resolve` is what the entry points call: the config loaded, its own checks
(:mod:`megarm.config.checks`) and these, every problem reported together. Only
``.idx`` files, file sizes and JSON are read (numpy, no torch).
"""

from __future__ import annotations

import os
from pathlib import Path

from megarm.checkpoint.layout import CheckpointNotFoundError, resolve_checkpoint
from megarm.config import (
    ConfigIssue,
    DataConfig,
    MegarmConfig,
    ModelConfig,
    Settings,
    TrainingConfig,
)
from megarm.config import (
    check as config_check,
)
from megarm.config import (
    resolve as config_resolve,
)
from megarm.config import (
    validate as config_issues,
)


def filesystem_issues(cfg: MegarmConfig) -> list[ConfigIssue]:
    """Every problem with the files and directories ``cfg`` names."""
    d, t, c = cfg.data, cfg.training, cfg.checkpoint
    issues = [
        ConfigIssue(key, f"path does not exist: {value}")
        for key, value in [
            ("data.tokenizer_name_or_path", d.tokenizer_name_or_path),
            ("checkpoint.load", c.load),
        ]
        if value and not Path(value).exists()
    ]
    if t.eval_benchmark and not Path(t.eval_benchmark).is_file():
        issues.append(ConfigIssue("training.eval_benchmark", f"no such file: {t.eval_benchmark}"))
    if c.load and Path(c.load).exists():
        try:  # file names only: a garbled tracker or an empty directory is named now
            resolve_checkpoint(c.load, c.ckpt_step)
        except CheckpointNotFoundError as exc:
            key = "checkpoint.ckpt_step" if c.ckpt_step is not None else "checkpoint.load"
            issues.append(ConfigIssue(key, str(exc)))
    if d.data_path:
        issues.extend(_validate_data_path(d, cfg.model))
        issues.extend(_objective_data_problems(d, t, cfg.model))
    return issues


def validate(cfg: MegarmConfig, world_size: int | None = None) -> list[ConfigIssue]:
    """The config's own problems and those of the files it names."""
    return config_issues(cfg, world_size) + filesystem_issues(cfg)


def check(cfg: MegarmConfig, world_size: int | None = None) -> MegarmConfig:
    """Raise :class:`~megarm.config.ConfigError` with every problem, or return ``cfg``."""
    return config_check(cfg, world_size, checks=validate)


def resolve(
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    world_size: int | None = None,
    settings: Settings | None = None,
) -> MegarmConfig:
    """Load, validate and check the files in one go, reporting every key, type,
    layout and file problem together."""
    return config_resolve(path, overrides, world_size, settings, checks=validate)


def _validate_data_path(d: DataConfig, m: ModelConfig) -> list[ConfigIssue]:
    """Check every prefix of ``data_path`` has its packed files, that they agree with
    each other and stats.json, fit data.seq_length and the model's vocabulary
    (:mod:`megarm.data.integrity`: the .idx files and sizes only, numpy)."""
    # Imported here, only with a data path: megarm.data (numpy) takes 0.12-0.14 s,
    # more than this whole module's 0.08-0.10 s (python -X importtime, this machine).
    from megarm.data.blend import parse_data_path, prefix_problems
    from megarm.data.integrity import prefix_issues

    try:
        blend = parse_data_path(d.data_path)  # type: ignore[arg-type]
    except ValueError as exc:
        return [ConfigIssue("data.data_path", str(exc))]
    issues = [ConfigIssue("data.data_path", msg) for _, prefix in blend for msg in prefix_problems(prefix)]
    if not issues:
        for _, prefix in blend:
            found = prefix_issues(prefix, d.seq_length, m.vocab_size, m.max_position_embeddings)
            issues += [ConfigIssue(key, msg) for key, msg in found]
    return issues


def _objective_data_problems(d: DataConfig, t: TrainingConfig, m: ModelConfig) -> list[ConfigIssue]:
    """SFT records train ``objective: sft`` only, ranked records ``listwise`` only,
    preference pairs ``rm`` or ``joint``."""
    from megarm.data.blend import data_kind, parse_data_path

    try:
        kinds = {prefix: data_kind(prefix) for _, prefix in parse_data_path(d.data_path)}  # type: ignore[arg-type]
    except ValueError:
        return []  # named by _validate_data_path
    wanted = {"sft": "sft", "listwise": "ranked", "regression": "regression", "prm": "prm"}.get(
        t.objective, "pairs")
    what = {"sft": "SFT records", "ranked": "ranked records", "pairs": "preference pairs",
            "regression": "regression records", "prm": "step-labelled solutions"}
    objective_for = {"sft": "sft", "ranked": "listwise", "pairs": "rm or joint",
                     "regression": "regression", "prm": "prm"}
    fixes = {
        "prm": "preprocess step-labelled solutions with --handler-name prm_steps (or "
        "math_shepherd)",
        "regression": "preprocess responses with attribute labels with --handler-name "
        "regression (or helpsteer2)",
        "sft": "preprocess SFT records with --handler-name sft",
        "ranked": "preprocess K scored responses per prompt with --handler-name ranked "
        "(or ultrafeedback_ranked)",
        "pairs": "preprocess preference pairs (e.g. --handler-name critique_pairs)",
    }
    for prefix, kind in kinds.items():
        if kind is not None and kind != wanted:
            return [ConfigIssue(
                "training.objective",
                f"{t.objective} trains on {what[wanted]} but {prefix} holds {what[kind]}; "
                f"set training.objective={objective_for[kind]} or {fixes[wanted]}",
            )]
    if wanted == "regression":
        return _label_data_problems(kinds, m)
    return []


def _label_data_problems(kinds: dict[str, str | None], m: ModelConfig) -> list[ConfigIssue]:
    """Regression data's ``label_names`` (stats.json) against ``model.num_labels`` and
    ``model.label_names``."""
    from megarm.data.stats_file import read_stats

    for prefix in kinds:
        names = (read_stats(prefix) or {}).get("label_names")
        if not isinstance(names, list):
            continue
        if len(names) != m.num_labels:
            return [ConfigIssue(
                "model.num_labels",
                f"{prefix} has {len(names)} labels ({','.join(names)}) but the head has "
                f"{m.num_labels}; set model.num_labels={len(names)} "
                f"model.label_names={','.join(names)}",
            )]
        if m.label_names and [n.strip() for n in m.label_names.split(",")] != names:
            return [ConfigIssue(
                "model.label_names",
                f"{m.label_names!r} differ from {prefix}'s labels {','.join(names)} (names "
                f"and order); set model.label_names={','.join(names)}",
            )]
    return []


def summary(cfg: MegarmConfig, world_size: int | None = None) -> str:
    """One line for ``python -m megarm.config`` after the YAML: that the config is
    valid, its layout, batch sizes, tokens per step and the memory estimate (per GPU,
    bf16, :mod:`megarm.training.memory`; no torch is imported)."""
    from megarm.training.memory import GIB, estimate

    p, t = cfg.parallel, cfg.training
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    cp = int(getattr(p, "context_parallel_size", 1) or 1)
    world = world_size or tp * pp * cp
    dp = max(1, world // (tp * pp * cp))
    steps = max(1, t.global_batch_size // (t.micro_batch_size * dp))
    # Each pair is two sequences (chosen, rejected) of at most seq_length tokens.
    tokens = 2 * t.global_batch_size * cfg.data.seq_length
    try:
        est = estimate(cfg, world, cuda=True)
        memory = f"memory ~{est.training_peak / GIB:.2f} GiB per GPU (bf16)"
    except Exception as exc:  # noqa: BLE001 - the estimate is a hint; the config stays valid
        memory = f"no memory estimate ({exc})"
    where = "" if world_size else " (no --world-size: DP 1)"
    return (
        f"valid: TP {tp} x PP {pp} x CP {cp} x DP {dp} = {world} rank{'s' if world != 1 else ''}{where} | micro-batch "
        f"{t.micro_batch_size} pairs, global batch {t.global_batch_size} pairs ({steps} "
        f"micro-batch{'es' if steps != 1 else ''} per rank per step) | up to {tokens:,} tokens "
        f"per step | {memory}"
    )
