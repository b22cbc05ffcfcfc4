"""The table of config options: every field of ``JobConfig``, nested sections included, with its type.

A section is a dotted path (``training``, ``training.dataloader``, ``quantize.linear.float8``): a TOML
table ``[quantize.linear.float8]`` and the command-line prefix ``--quantize.linear.float8.``.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import types
import typing
from dataclasses import dataclass
from typing import Any

from savepoint.config import job_config, sections
from savepoint.config.job_config import JobConfig


class Nested(list):
    """The base type of ``list[list[str]]`` options (``module_fqns_per_model_part``)."""


TYPE_NAMES = {bool: "bool", int: "int", float: "float", str: "str", list: "list[str]", Nested: "list[list[str]]"}
METAVARS = {int: "INT", float: "FLOAT", str: "STR", list: "A,B,...", Nested: "A,B;C,D;..."}


@dataclass(frozen=True)
class Option:
    """One config field: where it lives, its base type, whether it may be None, and its choices if a Literal."""

    section: str
    name: str
    base: type
    optional: bool
    default: Any
    owner: str  # dataclass name, the key for the docs table
    choices: tuple[str, ...] = ()  # a Literal's values; () for any value of the type
    str_ok: bool = False  # a list that TOML may also give as one comma-separated string

    @property
    def flag(self) -> str:
        return f"--{self.section}.{self.name}"

    @property
    def negative_flag(self) -> str:
        return f"--{self.section}.no_{self.name}"

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def type_name(self) -> str:
        return TYPE_NAMES[self.base] + (" or none" if self.optional else "")


@dataclass(frozen=True)
class _Kind:
    base: type
    optional: bool = False
    choices: tuple[str, ...] = ()
    str_ok: bool = False


def _classify(tp: Any) -> _Kind:
    """The base type, optionality and choices of the few annotation shapes the config uses."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 2 and str in inner and list[str] in inner:  # list[str] | str
            return _Kind(list, str_ok=True)
        assert len(inner) == 1, f"unsupported annotation {tp}"
        kind = _classify(inner[0])
        return dataclasses.replace(kind, optional=True)
    if origin is typing.Literal:
        assert all(isinstance(a, str) for a in args), f"unsupported Literal {tp}"
        return _Kind(str, choices=tuple(args))
    if origin is list and args == (list[str],):
        return _Kind(Nested)
    if origin is list:
        assert args == (str,), f"unsupported list annotation {tp}"
        return _Kind(list)
    assert tp in (bool, int, float, str), f"unsupported annotation {tp}"
    return _Kind(tp)


def _walk(cls: type, path: str, table: dict[str, dict[str, Option]], docs: dict[str, tuple[str, str]]) -> None:
    table[path] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            docs[f"{path}.{f.name}"] = (cls.__name__, f.name)
            _walk(tp, f"{path}.{f.name}", table, docs)
            continue
        kind = _classify(tp)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        table[path][f.name] = Option(path, f.name, kind.base, kind.optional, default, cls.__name__,
                                     kind.choices, kind.str_ok)


@functools.cache
def _tables() -> tuple[dict[str, dict[str, Option]], dict[str, tuple[str, str]]]:
    table: dict[str, dict[str, Option]] = {}
    docs: dict[str, tuple[str, str]] = {}
    hints = typing.get_type_hints(JobConfig)
    for section in dataclasses.fields(JobConfig):
        _walk(hints[section.name], section.name, table, docs)
    return {s: opts for s, opts in table.items() if opts}, docs


def options() -> dict[str, dict[str, Option]]:
    """All options, by dotted section then field name, in declaration order (a section before its subsections).

    Sections that only hold other sections (``quantize``, ``quantize.linear``) have no entry.
    """
    return _tables()[0]


def section_doc_keys() -> dict[str, tuple[str, str]]:
    """For each nested section, the (dataclass, field) whose docstring describes it."""
    return _tables()[1]


@functools.cache
def containers() -> frozenset[str]:
    """Every section path and every prefix of one: what a TOML table or a flag prefix may name."""
    names = set()
    for section in options():
        parts = section.split(".")
        names.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return frozenset(names)


def holder(cfg: Any, section: str) -> Any:
    """The dataclass instance of ``section`` (a dotted path) inside ``cfg``."""
    for part in section.split("."):
        cfg = getattr(cfg, part)
    return cfg


@functools.cache
def field_docs() -> dict[tuple[str, str], str]:
    """Attribute docstrings of the config dataclasses, keyed by (dataclass name, field name)."""
    docs: dict[tuple[str, str], str] = {}
    for module in (job_config, sections):
        for node in ast.parse(inspect.getsource(module)).body:
            if not isinstance(node, ast.ClassDef):
                continue
            for stmt, nxt in zip(node.body, node.body[1:], strict=False):
                if (
                    isinstance(stmt, ast.AnnAssign)
                    and isinstance(stmt.target, ast.Name)
                    and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)
                ):
                    docs[(node.name, stmt.target.id)] = inspect.cleandoc(nxt.value.value)
    return docs


def value_text(opt: Option, value: Any) -> str:
    """A value as the command line spells it (``a,b`` for a list, ``a,b;c`` for a list of lists)."""
    if value is None:
        return "none"
    if opt.base is list:
        text = ",".join(value) if isinstance(value, list) else str(value)
        return text or "empty"
    if opt.base is Nested:
        return ";".join(",".join(part) for part in value) or "empty"
    if opt.base is str and not value:
        return '""'
    return str(value)
