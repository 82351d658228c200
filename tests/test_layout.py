"""The package layout's import rules, read from the source (AST, not text search).

Library packages import no command and not the trainer; ``config`` is a leaf
above the file system; the checkpoint format builds no model; production code
imports no test helper. See README.md, "Layout".
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = (
    "megarm.train",
    "megarm.score",
    "megarm.serve",
    "megarm.evaluate",
    "megarm.reward_stats",
    "megarm.generate",
    "megarm.demo",
    "megarm.demo_cloud",
)
LIBRARY = (
    "megarm.rewards",
    "megarm.model",
    "megarm.checkpoint",
    "megarm.data",
    "megarm.config",
    "megarm.families",
    "megarm.platform",
    "megarm.distributed",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute, at any depth of the file (lazy
    imports inside functions count: they run too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            # `from megarm import score` imports the module megarm.score.
            found.update(
                f"{base}.{alias.name}"
                for alias in node.names
                if is_module(f"{base}.{alias.name}")
            )
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value)
    return found


def within(module: str, packages: tuple[str, ...] | str) -> bool:
    packages = (packages,) if isinstance(packages, str) else packages
    return any(module == p or module.startswith(p + ".") for p in packages)


def violations() -> list[str]:
    bad = []
    files = sorted([*(ROOT / "megarm").rglob("*.py"), *(ROOT / "ckpt_convert").rglob("*.py")])
    for path in files:
        name = module_name(path)
        for target in sorted(imports_of(path)):
            rule = None
            if within(target, ("megarm.testing", "tests")):
                rule = "production code imports a test helper"
            elif within(name, LIBRARY) and within(target, COMMANDS):
                rule = "library imports a command"
            elif within(name, LIBRARY) and within(target, "megarm.training"):
                rule = "library imports the trainer"
            elif within(name, "megarm.config") and within(
                target, ("megarm.checkpoint", "megarm.data")
            ):
                rule = "config imports checkpoint/data"
            elif within(name, "megarm.checkpoint") and within(target, "megarm.model"):
                rule = "the checkpoint format imports the model"
            elif within(name, "megarm.training") and within(target, COMMANDS):
                rule = "the trainer imports a command"
            if rule:
                bad.append(f"{name} -> {target}: {rule}")
    return bad


def test_import_rules_hold():
    assert violations() == []


def test_rule_walker_sees_relative_and_lazy_imports(tmp_path):
    # The walker must resolve relative imports and see imports inside functions.
    pkg = ROOT / "megarm" / "model"
    src = "def f():\n    from ..training import loop\n    from . import builder\n"
    probe = pkg / "_layout_probe.py"
    probe.write_text(src)
    try:
        found = imports_of(probe)
    finally:
        probe.unlink()
    assert "megarm.training.loop" in found and "megarm.model.builder" in found


def test_every_declared_command_is_a_callable_main():
    """``[project.scripts]`` names a ``main`` that exists, for every command module."""
    import importlib

    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), name
    declared = {target.partition(":")[0] for target in scripts.values()}
    assert {c for c in COMMANDS if c != "megarm.demo_cloud"} <= declared
