"""The package's layers: every import in savepoint/ points down, never up or sideways into a tool.

Top to bottom: cli / launch / job (a job's config checked against its model) -> train -> checkpoint
-> hf -> torch DCP. The converters (``convert``) sit beside the trainer and may use checkpoint and
hf; nothing below them uses them. ``config`` describes a job without knowing a model, data or a
checkpoint; ``models`` and ``data`` know nothing of config, checkpoint or hf (models may use
``distributed``). Leaf modules (errors, safe_io, durable, values, parallel_dims, dtypes,
pipeline_plan) use only each other.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "savepoint"

LEAVES = {"errors", "safe_io", "durable", "values", "parallel_dims", "dtypes", "pipeline_plan", "urls"}
# component of savepoint (first name after "savepoint.") -> components it must not import
FORBIDDEN: dict[str, set[str]] = {
    "config": {"models", "data", "checkpoint", "hf", "convert", "train", "distributed", "optim", "inspect"},
    "models": {"config", "data", "checkpoint", "hf", "convert", "train", "optim", "inspect"},
    "data": {"config", "models", "checkpoint", "hf", "convert", "train", "optim", "inspect"},
    "distributed": {"config", "models", "data", "checkpoint", "hf", "convert", "train", "optim", "inspect"},
    "pipelining": {"config", "models", "data", "checkpoint", "hf", "convert", "train", "optim", "inspect"},
    "hf": {"checkpoint", "convert", "train", "inspect"},
    "checkpoint": {"train", "convert", "inspect"},
    "train": {"convert", "inspect"},
}
# components that may import only these
ONLY: dict[str, set[str]] = {
    "lifeline": set(),  # the worker wrapper runs it with -I -S: standard library only
    **{leaf: LEAVES for leaf in LEAVES},
}
TOP = {"cli", "launch", "job"}  # composition: imported only by each other and the entry point
TOP_IMPORTERS = TOP | {"__main__"}


def _component(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "savepoint" and len(parts) > 1 else None


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path) -> set[str]:
    """Every savepoint module or name this file imports (lazy imports inside functions included)."""
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("savepoint.")}


def _violations() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        mine = _component(_module_name(path)) or "__init__"
        for name in sorted(_imported(path)):
            target = _component(name)
            if target is None or target == mine:
                continue
            rel = path.relative_to(PACKAGE.parent)
            if target in FORBIDDEN.get(mine, ()) or (mine in ONLY and target not in ONLY[mine]):
                problems.append(f"{rel}: {mine} imports {name}")
            elif target in TOP and mine not in TOP_IMPORTERS:
                problems.append(f"{rel}: {mine} imports {name}, which only cli/launch/job may use")
    return problems


def test_imports_point_down() -> None:
    assert _violations() == []


@pytest.mark.parametrize("source, name, expected", [
    ("savepoint/config/x.py", "savepoint.models.llama3.args.LLAMA3_FLAVORS", "config imports"),
    ("savepoint/models/llama3/x.py", "savepoint.data.tokenizer.VOCAB_SIZE", "models imports"),
    ("savepoint/data/x.py", "savepoint.checkpoint.states.check_count", "data imports"),
    ("savepoint/checkpoint/x.py", "savepoint.job.parse_args", "checkpoint imports"),
    ("savepoint/train.py", "savepoint.job.parse_args", "only cli/launch/job"),
    ("savepoint/durable.py", "savepoint.config.JobConfig", "durable imports"),
])
def test_the_rules_catch_an_upward_import(tmp_path, monkeypatch, source, name, expected) -> None:
    """The check itself: a crafted upward import in a scratch package is reported."""
    scratch = tmp_path / "savepoint"
    path = scratch / Path(source).relative_to("savepoint")
    path.parent.mkdir(parents=True)
    module, _, attr = name.rpartition(".")
    path.write_text(f"from {module} import {attr}\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", scratch)
    assert any(expected in v for v in _violations()), _violations()
