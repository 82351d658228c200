"""Loading a config: defaults, then a YAML file, typed settings and ``section.key=value``
overrides, each value type-checked against the schema; then the model's shape from
``model.hf_config`` through its family's table. Reads only the YAML and the HF
``config.json`` named; every other check is in :mod:`megarm.config.checks`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from megarm import families
from megarm.config.schema import (
    SECTIONS,
    ConfigError,
    ConfigIssue,
    MegarmConfig,
    ModelConfig,
    _hints,
    describe_type,
)

# --------------------------------------------------------------------------- coercion


class _BadValue(Exception):
    pass


def _coerce(value: Any, tp: Any) -> Any:
    """Convert a YAML value to ``tp`` or raise _BadValue."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except _BadValue:
                pass
        raise _BadValue
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (list, tuple)):
            return [_coerce(v, item) for v in value]
        raise _BadValue
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise _BadValue
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _BadValue
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _BadValue
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            try:
                return float(value)
            except ValueError:
                raise _BadValue from None
        raise _BadValue
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise _BadValue
    raise _BadValue


# --------------------------------------------------------------------------- loading


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _all_keys() -> list[str]:
    return [f"{s}.{k}" for s, cls in SECTIONS.items() for k in _hints(cls)]


def _apply(
    cfg: MegarmConfig, section: str, key: str, value: Any, issues: list[ConfigIssue]
) -> bool:
    """Set ``section.key = value`` with type checking; record an issue on failure."""
    if section not in SECTIONS:
        dotted = f"{section}.{key}" if key else section
        bare = [k.split(".", 1)[1] for k in _all_keys()]
        hint = _suggest(section, list(SECTIONS))
        if not hint and section in bare:
            owner = next(k for k in _all_keys() if k.endswith("." + section))
            hint = f" (did you mean '{owner}'?)"
        issues.append(
            ConfigIssue(dotted, f"unknown section '{section}'{hint}; sections: {', '.join(SECTIONS)}")
        )
        return False
    cls = SECTIONS[section]
    hints = _hints(cls)
    if key not in hints:
        elsewhere = [s for s, c in SECTIONS.items() if key in _hints(c)]
        hint = f" (did you mean '{elsewhere[0]}.{key}'?)" if elsewhere else _suggest(key, list(hints))
        if hint.startswith(" (did you mean '") and not elsewhere:
            hint = hint.replace("'", f"'{section}.", 1)
        issues.append(ConfigIssue(f"{section}.{key}", f"unknown key{hint}"))
        return False
    try:
        coerced = _coerce(value, hints[key])
    except _BadValue:
        issues.append(
            ConfigIssue(
                f"{section}.{key}",
                f"expected {describe_type(hints[key])}, got {value!r} "
                f"({type(value).__name__})",
            )
        )
        return False
    setattr(getattr(cfg, section), key, coerced)
    return True


def parse_override(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` -> (section, key, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError([ConfigIssue(text, "an override must look like section.key=value")])
    dotted, raw = text.split("=", 1)
    if "." not in dotted:
        raise ConfigError(
            [ConfigIssue(dotted, f"overrides name a section too{_dotted_hint(dotted)}")]
        )
    section, key = dotted.strip().split(".", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return section, key, value


def _dotted_hint(key: str) -> str:
    owners = [k for k in _all_keys() if k.endswith("." + key)]
    return f" (did you mean '{owners[0]}'?)" if owners else ""


Settings = dict[str, dict[str, Any]]
"""Typed values by section and key, e.g. a checkpoint's saved model shape
(``{"model": {"num_layers": 24, ...}}``): set after the YAML, before the overrides,
with the same type checks."""


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    settings: Settings | None = None,
) -> MegarmConfig:
    """Build the config from defaults, an optional YAML file, typed ``settings``
    and overrides.

    Raises :class:`ConfigError` listing every unknown key and wrong type. Model
    shape fields are then filled from ``model.hf_config`` when it is set (a YAML key
    that disagrees with it is an error; a command-line override wins, with a note).
    :func:`megarm.config.checks.resolve` also runs the cross-field checks.
    """
    cfg, issues = _load(path, overrides, settings)
    if issues:
        raise ConfigError(issues)
    return cfg


class StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, stricter for configs: an alias (``*name``) is refused (a
    few nested aliases expand to gigabytes before any value is checked), and so is a
    key given twice in one mapping (the second would silently replace the first)."""

    def compose_node(self, parent: Any, index: Any) -> Any:  # noqa: ANN401 - PyYAML's types
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(
                None, None, "aliases (*name) are not allowed in a megarm config; write the "
                "value out", event.start_mark,
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> dict:  # noqa: ANN401
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (lines {seen[key]} and {line}); "
                    "keep one", key_node.start_mark,
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _load(
    path: str | os.PathLike | None,
    overrides: list[str] | None,
    settings: Settings | None = None,
) -> tuple[MegarmConfig, list[ConfigIssue]]:
    cfg = MegarmConfig()
    issues: list[ConfigIssue] = []
    # Keys set explicitly -> where: the YAML's path, or COMMAND_LINE (which wins).
    explicit: dict[str, str] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError([ConfigIssue("--config", f"no such file: {path}")])
        try:
            raw = yaml.load(path.read_text(), Loader=StrictLoader) or {}  # noqa: S506 - a SafeLoader
        except yaml.YAMLError as exc:
            raise ConfigError([ConfigIssue("--config", f"{path} is not valid YAML: {exc}")]) from exc
        if not isinstance(raw, dict):
            raise ConfigError([ConfigIssue("--config", f"{path} must hold a mapping of sections")])
        for section, body in raw.items():
            if body is None and section in SECTIONS:
                continue  # an empty section keeps its defaults
            if not isinstance(body, dict):
                if section in SECTIONS:
                    issues.append(ConfigIssue(section, "a section must be a mapping of keys"))
                else:
                    _apply(cfg, str(section), "", body, issues)
                continue
            for key, value in body.items():
                if _apply(cfg, str(section), str(key), value, issues):
                    explicit[f"{section}.{key}"] = str(path)
    for section, values in (settings or {}).items():
        for key, value in values.items():
            if _apply(cfg, section, key, value, issues):
                explicit[f"{section}.{key}"] = COMMAND_LINE
    for text in overrides or []:
        try:
            section, key, value = parse_override(text)
        except ConfigError as exc:
            issues.extend(exc.issues)
            continue
        if _apply(cfg, section, key, value, issues):
            explicit[f"{section}.{key}"] = COMMAND_LINE
    if cfg.model.hf_config:
        try:
            _fill_from_hf(cfg, explicit)
        except ConfigError as exc:
            issues.extend(exc.issues)
    _fill_from_family(cfg, explicit)
    return cfg, issues


def hf_config_path(hf_config: str) -> Path:
    """The config.json that ``model.hf_config`` names (a directory or the file)."""
    path = Path(hf_config)
    return path / "config.json" if path.is_dir() else path


def read_hf_config(hf_config: str) -> dict[str, Any]:
    """Read a HuggingFace config.json (plain JSON: no torch, no transformers)."""
    path = hf_config_path(hf_config)
    if not path.is_file():
        raise ConfigError(
            [ConfigIssue("model.hf_config", f"no config.json at {path}; point it at a HF model dir")]
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError([ConfigIssue("model.hf_config", f"{path} is not valid JSON: {exc}")]) from exc
    if not isinstance(data, dict):
        raise ConfigError([ConfigIssue("model.hf_config", f"{path} must hold a JSON object")])
    return data


COMMAND_LINE = "the command line"
HF_CONFIG = "model.hf_config"


def _note(message: str) -> None:
    """Tell the user something the run decided, once per job (rank 0 or no torchrun)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"megarm.config: {message}", file=sys.stderr, flush=True)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


def _fill_from_hf(cfg: MegarmConfig, explicit: dict[str, str]) -> None:
    """The model's keys from ``model.hf_config``, through its family's table
    (:mod:`megarm.families`; a model megarm cannot represent is refused by name). A
    key the YAML also gives must agree with it (a silent mismatch once trained and
    exported a wrong ``rope_theta``); one given on the command line wins, and the
    run says so."""
    hf_path = hf_config_path(cfg.model.hf_config)  # type: ignore[arg-type]
    hf = read_hf_config(cfg.model.hf_config)  # type: ignore[arg-type]
    try:
        found = families.detect(hf, str(hf_path)).read(hf, str(hf_path))
    except families.FamilyError as exc:
        raise ConfigError([ConfigIssue("model.hf_config", str(exc))]) from exc
    issues: list[ConfigIssue] = []
    hints = _hints(ModelConfig)
    for ours, read in found.items():
        source = explicit.get(f"model.{ours}")
        # An explicit kv_channels: null means "derive it", which the HF value does.
        if source is None or (ours == "kv_channels" and cfg.model.kv_channels is None):
            if _apply(cfg, "model", ours, read.value, issues):
                explicit[f"model.{ours}"] = HF_CONFIG
            continue
        try:
            theirs = _coerce(read.value, hints[ours])
        except _BadValue:
            _apply(MegarmConfig(), "model", ours, read.value, issues)  # records the type issue
            continue
        mine = getattr(cfg.model, ours)
        if _same(mine, theirs):
            continue
        if source == COMMAND_LINE:
            _note(
                f"model.{ours}={mine!r} from the command line overrides {read.describe()} "
                f"of model.hf_config {hf_path}"
            )
        else:
            issues.append(ConfigIssue(
                f"model.{ours}",
                f"{source} sets {mine!r} but model.hf_config {hf_path} has {read.describe()}; "
                f"remove model.{ours} from {source} to take the checkpoint's value, or choose "
                f"one on the command line (model.{ours}=...)",
            ))
    if issues:
        raise ConfigError(issues)


def _fill_from_family(cfg: MegarmConfig, explicit: dict[str, str]) -> None:
    """The fields ``model.family`` fixes (QKV bias, QK-norm), where nothing set them;
    a value set against the family is named by :func:`validate`."""
    fixed = families.family(cfg.model.family).fixed
    for name, value in fixed.items():
        if f"model.{name}" not in explicit:
            setattr(cfg.model, name, value)


def to_dict(cfg: MegarmConfig) -> dict[str, Any]:
    """Plain nested dict of the config (YAML/JSON friendly)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: MegarmConfig) -> str:
    """The resolved config as YAML, loadable by :func:`load_config`."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


