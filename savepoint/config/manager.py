"""Turns defaults, a TOML file and command-line overrides into one validated ``JobConfig``.

Precedence is CLI > TOML > dataclass defaults. Every problem found on the way (TOML syntax,
unknown sections or keys, wrong types, stray arguments, then semantic checks from
:mod:`savepoint.config.validate`, then the caller's extra checks) is collected and raised as one
:class:`ConfigError`.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import logging
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from savepoint.config import job_config
from savepoint.config.job_config import JobConfig
from savepoint.config.validate import validate
from savepoint.errors import ConfigError
from savepoint.safe_io import read_regular

logger = logging.getLogger(__name__)

CONFIG_FILE_ENV = "CONFIG_FILE"
CONFIG_FILE_LIMIT = 1 << 20  # 1 MiB: a job config is a few KB


class _Nested(list):
    """The base type of ``list[list[str]]`` options (``module_fqns_per_model_part``)."""


_TYPE_NAMES = {bool: "bool", int: "int", float: "float", str: "str", list: "list[str]", _Nested: "list[list[str]]"}
_METAVARS = {int: "INT", float: "FLOAT", str: "STR", list: "A,B,...", _Nested: "A,B;C,D;..."}


@dataclass(frozen=True)
class _Option:
    """One config field: where it lives, its base type, and whether it may be None."""

    section: str
    name: str
    base: type
    optional: bool
    default: Any
    owner: str  # dataclass name, the key for the docs table

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
        return _TYPE_NAMES[self.base] + (" or none" if self.optional else "")


_Override = tuple[_Option, Any]


def _classify(tp: Any) -> tuple[type, bool]:
    """Return (base type, optional) for the few annotation shapes job_config uses."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        assert len(inner) == 1, f"unsupported annotation {tp}"
        return _classify(inner[0])[0], True
    if origin is list and args == (list[str],):
        return _Nested, False
    if origin is list:
        assert args == (str,), f"unsupported list annotation {tp}"
        return list, False
    assert tp in (bool, int, float, str), f"unsupported annotation {tp}"
    return tp, False


@functools.cache
def _options() -> dict[str, dict[str, _Option]]:
    """All options, by section then field name, in declaration order."""
    table: dict[str, dict[str, _Option]] = {}
    for section in dataclasses.fields(JobConfig):
        cls = typing.get_type_hints(JobConfig)[section.name]
        hints = typing.get_type_hints(cls)
        table[section.name] = {}
        for f in dataclasses.fields(cls):
            base, optional = _classify(hints[f.name])
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            table[section.name][f.name] = _Option(
                section.name, f.name, base, optional, default, cls.__name__
            )
    return table


@functools.cache
def field_docs() -> dict[tuple[str, str], str]:
    """Attribute docstrings of job_config.py, keyed by (dataclass name, field name)."""
    docs: dict[tuple[str, str], str] = {}
    for node in ast.parse(inspect.getsource(job_config)).body:
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


def _suggest(section: str, key: str) -> tuple[str, str] | None:
    """The closest known (section, key) for a misspelt one, or None."""
    options = _options()
    for other, opts in options.items():
        if key in opts:  # right key, wrong section
            return other, key
    if section in options:
        keys = list(options[section])
        keys += [f"no_{k}" for k, o in options[section].items() if o.base is bool]
        match = difflib.get_close_matches(key, keys, n=1)
        if match:
            return section, match[0]
    dotted = [f"{s}.{k}" for s, opts in options.items() for k in opts]
    match = difflib.get_close_matches(f"{section}.{key}", dotted, n=1)
    if match:
        sec, _, k = match[0].partition(".")
        return sec, k
    return None


def _hint(match: tuple[str, str] | None, dash: str) -> str:
    return f"; did you mean {dash}{match[0]}.{match[1]}?" if match else ""


def _lookup_flag(name: str) -> tuple[_Option | None, bool, str | None]:
    """Resolve ``section.key`` to (option, negated, problem); ``no_`` negates a bool."""
    typed = f"--{name}"
    section_raw, dot, key_raw = name.partition(".")
    section, key = section_raw.replace("-", "_"), key_raw.replace("-", "_")
    options = _options()
    if not dot or not key:
        hint = _hint(_suggest(section, key), "--")
        return None, False, f"unknown option {typed}: options look like --section.key{hint}"
    if section not in options:
        known = difflib.get_close_matches(section, list(options), n=1)
        match = _suggest(section, key) or ((known[0], key) if known else None)
        return None, False, f"unknown section '{section_raw}' in {typed}{_hint(match, '--')}"
    opts = options[section]
    if key in opts:
        return opts[key], False, None
    if key.startswith("no_") and key[3:] in opts and opts[key[3:]].base is bool:
        return opts[key[3:]], True, None
    return None, False, f"unknown option {typed}{_hint(_suggest(section, key), '--')}"


def _from_cli(opt: _Option, raw: str, typed: str) -> tuple[Any, str | None]:
    """Convert one command-line token to the option's type: (value, problem)."""
    if opt.optional and raw in ("none", "None"):
        return None, None
    if opt.base is int:
        if re.fullmatch(r"\s*[+-]?\d+\s*", raw):
            return int(raw), None
    elif opt.base is float:
        try:
            return float(raw), None
        except ValueError:
            pass
    elif opt.base is list:
        return [part.strip() for part in raw.split(",") if part.strip()], None
    elif opt.base is _Nested:  # parts separated by ';', names within a part by ','
        return [[n.strip() for n in part.split(",") if n.strip()] for part in raw.split(";") if part.strip()], None
    else:
        return raw, None
    return None, f"{typed}: expected {opt.type_name}, got {raw!r}"


def _parse_cli(argv: Sequence[str]) -> tuple[list[_Override], list[str]]:
    """Split argv into typed overrides and problems; nothing is applied yet."""
    overrides: list[_Override] = []
    problems: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if not token.startswith("--") or token == "--":
            problems.append(
                f"unexpected argument {token!r}: options look like --section.key VALUE (see --help)"
            )
            continue
        name, has_eq, inline = token[2:].partition("=")
        typed = f"--{name}"
        takes_next = not has_eq and i < len(argv) and not argv[i].startswith("--")
        opt, negated, problem = _lookup_flag(name)
        if opt is None:
            problems.append(problem or typed)
            i += takes_next  # swallow the value meant for the unknown option
        elif opt.base is bool:
            if has_eq or takes_next:
                given = inline if has_eq else argv[i]
                i += takes_next
                problems.append(
                    f"{typed} is a switch and takes no value (got {given!r}): "
                    f"use {opt.flag} to turn it on or {opt.negative_flag} to turn it off"
                )
            else:
                overrides.append((opt, not negated))
        elif not has_eq and not takes_next:
            problems.append(
                f"{typed} needs a value ({opt.type_name}): {opt.flag} VALUE or {opt.flag}=VALUE"
            )
        else:
            raw = inline if has_eq else argv[i]
            i += not has_eq
            value, problem = _from_cli(opt, raw, typed)
            if problem:
                problems.append(problem)
            else:
                overrides.append((opt, value))
    return overrides, problems


def _from_toml(opt: _Option, value: Any) -> tuple[Any, bool]:
    """Check a TOML value against the option's type: (converted value, ok)."""
    if opt.base is bool:
        return value, isinstance(value, bool)
    if opt.base is int:
        return value, isinstance(value, int) and not isinstance(value, bool)
    if opt.base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return (float(value) if ok else value), ok
    if opt.base is list:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        return (list(value) if ok else value), ok
    if opt.base is _Nested:
        ok = isinstance(value, list) and all(isinstance(p, list) and all(isinstance(v, str) for v in p) for p in value)
        return ([list(p) for p in value] if ok else value), ok
    return value, isinstance(value, str)


def _toml_overrides(data: dict[str, Any], path: str) -> tuple[list[_Override], list[str]]:
    """Typed overrides from a parsed TOML document, plus every problem in it."""
    overrides: list[_Override] = []
    problems: list[str] = []
    options = _options()
    for section, table in data.items():
        if section not in options:
            if isinstance(table, dict):
                known = difflib.get_close_matches(section, list(options), n=1)
                hint = f"; did you mean [{known[0]}]?" if known else ""
                problems.append(f"unknown section [{section}] in {path}{hint}")
            else:
                hint = _hint(_suggest("", section), "")
                problems.append(f"key {section!r} in {path} is outside any [section]{hint}")
            continue
        if not isinstance(table, dict):
            problems.append(f"{section} in {path}: expected a [{section}] table, got {table!r}")
            continue
        for key, value in table.items():
            opt = options[section].get(key)
            if opt is None:
                hint = _hint(_suggest(section, key), "")
                problems.append(f"unknown key {section}.{key} in {path}{hint}")
            elif opt.dotted == "job.config_file":
                problems.append(
                    f"job.config_file in {path}: a config file cannot name another; "
                    f"pass --job.config_file or set {CONFIG_FILE_ENV} instead"
                )
            else:
                converted, ok = _from_toml(opt, value)
                if ok:
                    overrides.append((opt, converted))
                else:
                    problems.append(
                        f"{opt.dotted} in {path}: expected {_TYPE_NAMES[opt.base]}, "
                        f"got {type(value).__name__} {value!r}"
                    )
    return overrides, problems


class _Unreadable(Exception):
    """The config file is not a regular file of sane size (raised by ``safe_io.read_regular``)."""


def _read_toml(path: str, origin: str) -> tuple[dict[str, Any] | None, list[str]]:
    """Parse the TOML file; a missing, unreadable, oversized or non-UTF-8 file or a syntax error becomes a problem.

    The path is the user's choice, so a symlink to a config is followed; what it names must be a
    regular file of at most ``CONFIG_FILE_LIMIT`` bytes (``/dev/zero`` or a FIFO is refused unread).
    """
    try:
        data = read_regular(os.path.realpath(path), CONFIG_FILE_LIMIT, "config file", error=_Unreadable)
        return tomllib.loads(data.decode("utf-8")), []
    except tomllib.TOMLDecodeError as e:
        return None, [f"{path}: TOML syntax error: {e}; fix the file (from {origin})"]
    except UnicodeDecodeError as e:
        return None, [f"{path} is not UTF-8 text (byte {e.start}); a config file is TOML (from {origin})"]
    except _Unreadable as e:
        return None, [f"config file {path} (from {origin}): {e}"]
    except OSError as e:
        return None, [f"cannot read config file {path} (from {origin}): {e.strerror or e}"]


def _config_file(cli: list[_Override], environ: Mapping[str, str]) -> tuple[str | None, str]:
    """The TOML path and where it came from: --job.config_file, else CONFIG_FILE, else none."""
    for opt, value in reversed(cli):
        if opt.dotted == "job.config_file":
            return value or None, "--job.config_file"
    env = environ.get(CONFIG_FILE_ENV, "")
    return (env or None), f"{CONFIG_FILE_ENV}={env}"


def _apply(cfg: JobConfig, overrides: list[_Override]) -> None:
    for opt, value in overrides:
        setattr(getattr(cfg, opt.section), opt.name, value)


Check = Callable[[JobConfig], list[str]]


def parse_args(argv: Sequence[str], environ: Mapping[str, str] | None = None,
               checks: Sequence[Check] = ()) -> JobConfig:
    """Build the job config from defaults, the TOML file and ``argv`` (CLI > TOML > defaults).

    The TOML file is ``--job.config_file PATH``, else ``$CONFIG_FILE`` when set and non-empty.
    ``argv`` excludes the program name; ``--help`` is not handled here (see :func:`wants_help`).
    ``checks`` run after :func:`validate`, each returning its problems: the checks that need to
    know more than the config (``savepoint.job`` passes the model's).

    Raises:
        ConfigError: listing every problem in the file, the command line and the values.
    """
    environ = os.environ if environ is None else environ
    cli, cli_problems = _parse_cli(argv)
    path, origin = _config_file(cli, environ)
    cfg = JobConfig()
    problems: list[str] = []
    if path is not None:
        data, problems = _read_toml(path, origin)
        if data is not None:
            from_file, file_problems = _toml_overrides(data, path)
            problems += file_problems
            _apply(cfg, from_file)
        logger.debug("read config file %s (from %s)", path, origin)
    _apply(cfg, cli)
    cfg.job.config_file = path
    problems += cli_problems
    problems += validate(cfg)
    for check in checks:
        problems += check(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def wants_help(argv: Sequence[str]) -> bool:
    """True when argv asks for help (``-h`` or ``--help``); check this before :func:`parse_args`."""
    return any(arg in ("-h", "--help") for arg in argv)


def _value_text(opt: _Option, value: Any) -> str:
    """A value as the command line spells it (``a,b`` for a list, ``a,b;c`` for a list of lists)."""
    if value is None:
        return "none"
    if opt.base is list:
        return ",".join(value) or "empty"
    if opt.base is _Nested:
        return ";".join(",".join(part) for part in value) or "empty"
    if opt.base is str and not value:
        return '""'
    return str(value)


def _default_text(opt: _Option) -> str:
    return _value_text(opt, opt.default)


def _effective_values(argv: Sequence[str], environ: Mapping[str, str]) -> tuple[dict[str, Any], str]:
    """What the TOML file and ``argv`` set, by dotted key, as (value, where from); and a line naming the sources.

    Lenient: a problem anywhere only leaves that value out (``--help`` must work on a broken config;
    running without it reports the problems).
    """
    cli, problems = _parse_cli([a for a in argv if a not in ("-h", "--help")])
    path, origin = _config_file(cli, environ)
    values: dict[str, tuple[Any, str]] = {}
    if path is not None:
        data, file_problems = _read_toml(path, origin)
        problems += file_problems
        if data is not None:
            from_file, more = _toml_overrides(data, path)
            problems += more
            values.update((opt.dotted, (value, path)) for opt, value in from_file)
    values.update((opt.dotted, (value, "the command line")) for opt, value in cli)
    how = CONFIG_FILE_ENV if origin.startswith(CONFIG_FILE_ENV + "=") else origin
    where = f"{path} (from {how}), then the command line" if path else "the command line (no config file)"
    note = f"This job's values (shown as '= VALUE'): the defaults, then {where}."
    if problems:
        note += f" The config has {len(problems)} problem(s); run without --help to see them."
    return values, note


def help_text(prog: str = "savepoint train", argv: Sequence[str] | None = None,
              environ: Mapping[str, str] | None = None) -> str:
    """The ``--help`` text: usage, where the TOML file comes from, and every option with its doc.

    With ``argv`` (the command line ``--help`` came with), each option whose value the config file
    or the command line sets shows that value and where it came from, next to the default.
    """
    lines = [
        f"usage: {prog} [--section.key VALUE | --section.key=VALUE | --section.switch] ...",
        "",
        "Values come from the dataclass defaults, then a TOML file, then the command line",
        "(command line wins). The TOML file is --job.config_file PATH, or else the",
        f"{CONFIG_FILE_ENV} environment variable when set and non-empty. Switches take no value",
        "(--checkpoint.enable / --checkpoint.no_enable); lists take one comma-separated token",
        "(--checkpoint.exclude_from_loading optimizer,lr_scheduler), lists of lists one token with",
        "';' between the lists (--parallelism.module_fqns_per_model_part a,b;c,d); 'none' unsets",
        "an optional value. Hyphens and underscores are interchangeable in option names.",
    ]
    values: dict[str, tuple[Any, str]] = {}
    if argv is not None:
        values, note = _effective_values(argv, os.environ if environ is None else environ)
        lines += ["", note]
    docs = field_docs()
    for section, opts in _options().items():
        lines += ["", f"[{section}]"]
        for opt in opts.values():
            if opt.base is bool:
                usage = f"{opt.flag} / {opt.negative_flag}"
            else:
                usage = f"{opt.flag} {_METAVARS[opt.base]}"
            if opt.dotted in values:
                value, source = values[opt.dotted]
                usage += f" = {_value_text(opt, value)} (from {source}; default: {_default_text(opt)})"
            else:
                usage += f" (default: {_default_text(opt)})"
            lines.append(f"  {usage}")
            lines.append("      " + docs.get((opt.owner, opt.name), "").replace("\n", "\n      "))
    return "\n".join(lines) + "\n"


def config_to_dict(cfg: JobConfig) -> dict[str, Any]:
    """The resolved config as plain JSON-ready data, one dict per section."""
    return dataclasses.asdict(cfg)


def _toml_str(text: str) -> str:
    escaped = []
    for ch in text:
        if ch in ('"', "\\"):
            escaped.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            escaped.append(f"\\u{ord(ch):04x}")
        else:
            escaped.append(ch)
    return '"' + "".join(escaped) + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):  # of strings, or of lists of strings
        return "[" + ", ".join(_toml_value(v) if isinstance(v, list) else _toml_str(str(v)) for v in value) + "]"
    return _toml_str(str(value))


def config_to_toml(cfg: JobConfig) -> str:
    """The config as a TOML file that ``--job.config_file`` reads back to the same values.

    None values (TOML has no null) and ``job.config_file`` are left out.
    """
    lines = ["# Resolved savepoint config. Re-run with: --job.config_file <this file>"]
    for section, opts in _options().items():
        lines += ["", f"[{section}]"]
        values = getattr(cfg, section)
        for name, opt in opts.items():
            value = getattr(values, name)
            if value is None or opt.dotted == "job.config_file":
                continue
            lines.append(f"{name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
