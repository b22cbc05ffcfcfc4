"""Turns defaults, a TOML file and command-line overrides into one validated ``JobConfig``.

Precedence is CLI > TOML > dataclass defaults. Every problem found on the way (TOML syntax,
unknown sections or keys, wrong types, stray arguments, then semantic checks from
:mod:`savepoint.config.validate`, then the caller's extra checks) is collected and raised as one
:class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from savepoint.config.job_config import JobConfig
from savepoint.config.options import (
    METAVARS,
    TYPE_NAMES,
    Nested,
    Option,
    containers,
    field_docs,
    holder,
    options,
    section_doc_keys,
    value_text,
)
from savepoint.config.titan import alias_problems
from savepoint.config.validate import validate
from savepoint.errors import ConfigError
from savepoint.safe_io import read_regular

logger = logging.getLogger(__name__)

CONFIG_FILE_ENV = "CONFIG_FILE"
CONFIG_FILE_LIMIT = 1 << 20  # 1 MiB: a job config is a few KB


_Override = tuple[Option, Any]


def _close(word: str, choices: list[str], cutoff: float = 0.6) -> str | None:
    match = difflib.get_close_matches(word, choices, n=1, cutoff=cutoff)
    return match[0] if match else None


def _hint(section: str, key: str, dash: str) -> str:
    """'; did you mean ...?' for a misspelt ``section.key``, or "" when nothing known is close.

    Offered: the same key in another section (the one whose name is closest, else all of them), a key
    close to one of its section's keys, a section whose name is close (with its key if that is close too).
    """
    opts = options()
    others = [s for s, o in opts.items() if key in o and s != section]
    if section in opts or not section:
        near = _close(section, others) if section else None
        if near or len(others) == 1:
            return f"; did you mean {dash}{near or others[0]}.{key}?"
        if others:
            return f"; {key} is a key of " + ", ".join(f"[{s}]" for s in others)
        if not section:
            return ""
        keys = list(opts[section]) + [f"no_{k}" for k, o in opts[section].items() if o.base is bool]
        match = _close(key, keys)
        return f"; did you mean {dash}{section}.{match}?" if match else ""
    if section in containers():
        return ""
    near = _close(section, others)
    if near:
        return f"; did you mean {dash}{near}.{key}?"
    close = _close(section, list(opts))
    if not close:
        return ""
    match = _close(key, list(opts[close]), cutoff=0.75)
    if match:
        return f"; did you mean {dash}{close}.{match}?"
    return f"; did you mean a key of [{close}] (see --help)?" if dash else f"; did you mean [{close}]?"


def _lookup_flag(name: str) -> tuple[Option | None, bool, str | None]:
    """Resolve ``section.key`` (the section may be nested: ``a.b.key``) to (option, negated, problem);
    ``no_`` negates a bool."""
    typed = f"--{name}"
    section_raw, dot, key_raw = name.rpartition(".")
    section, key = section_raw.replace("-", "_"), key_raw.replace("-", "_")
    opts = options()
    if not dot or not key or not section:
        hint = _hint("", key or section, "--")
        return None, False, f"unknown option {typed}: options look like --section.key{hint}"
    if section not in opts:
        if section in containers():
            inside = ", ".join(f"[{s}]" for s in opts if s.startswith(section + "."))
            return None, False, f"unknown option {typed}: [{section}] holds only the sections {inside}"
        return None, False, f"unknown section '{section_raw}' in {typed}{_hint(section, key, '--')}"
    if key in opts[section]:
        return opts[section][key], False, None
    if key.startswith("no_") and key[3:] in opts[section] and opts[section][key[3:]].base is bool:
        return opts[section][key[3:]], True, None
    return None, False, f"unknown option {typed}{_hint(section, key, '--')}"


def _from_cli(opt: Option, raw: str, typed: str) -> tuple[Any, str | None]:
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
    elif opt.base is Nested:  # parts separated by ';', names within a part by ','
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


def _from_toml(opt: Option, value: Any) -> tuple[Any, bool]:
    """Check a TOML value against the option's type: (converted value, ok)."""
    if opt.base is bool:
        return value, isinstance(value, bool)
    if opt.base is int:
        return value, isinstance(value, int) and not isinstance(value, bool)
    if opt.base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return (float(value) if ok else value), ok
    if opt.base is list:
        if opt.str_ok and isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()], True
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        return (list(value) if ok else value), ok
    if opt.base is Nested:
        ok = isinstance(value, list) and all(isinstance(p, list) and all(isinstance(v, str) for v in p) for p in value)
        return ([list(p) for p in value] if ok else value), ok
    return value, isinstance(value, str)


def _toml_value_override(opt: Option, value: Any, path: str) -> tuple[_Override | None, str | None]:
    if opt.dotted == "job.config_file":
        return None, (f"job.config_file in {path}: a config file cannot name another; "
                      f"pass --job.config_file or set {CONFIG_FILE_ENV} instead")
    converted, ok = _from_toml(opt, value)
    if ok:
        return (opt, converted), None
    return None, f"{opt.dotted} in {path}: expected {TYPE_NAMES[opt.base]}, got {type(value).__name__} {value!r}"


def _toml_overrides(data: dict[str, Any], path: str, section: str = "") -> tuple[list[_Override], list[str]]:
    """Typed overrides from a parsed TOML document (or, with ``section``, one of its tables), plus every problem.

    A table inside a table is a nested section: ``[training.dataloader]``, ``[quantize.linear.float8]``.
    """
    overrides: list[_Override] = []
    problems: list[str] = []
    opts = options()
    for key, value in data.items():
        child = f"{section}.{key}" if section else key
        if child in containers():
            if isinstance(value, dict):
                more, more_problems = _toml_overrides(value, path, child)
                overrides += more
                problems += more_problems
            else:
                problems.append(f"{child} in {path}: expected a [{child}] table, got {value!r}")
        elif section in opts and key in opts[section]:
            override, problem = _toml_value_override(opts[section][key], value, path)
            overrides += [override] if override else []
            problems += [problem] if problem else []
        elif isinstance(value, dict):
            close = _close(child, list(containers()))
            hint = f"; did you mean [{close}]?" if close else ""
            problems.append(f"unknown section [{child}] in {path}{hint}")
        elif not section:
            problems.append(f"key {key!r} in {path} is outside any [section]{_hint('', key, '')}")
        else:
            problems.append(f"unknown key {child} in {path}{_hint(section, key, '')}")
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
        setattr(holder(cfg, opt.section), opt.name, value)


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
    from_file: list[_Override] = []
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
    problems += alias_problems(cfg, {opt.dotted for opt, _ in from_file + cli})
    problems += validate(cfg)
    for check in checks:
        problems += check(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def wants_help(argv: Sequence[str]) -> bool:
    """True when argv asks for help (``-h`` or ``--help``); check this before :func:`parse_args`."""
    return any(arg in ("-h", "--help") for arg in argv)


def _default_text(opt: Option) -> str:
    return value_text(opt, opt.default)


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
    section_docs = section_doc_keys()
    for section, opts in options().items():
        lines += ["", f"[{section}]"]
        if section in section_docs:
            lines.append("  " + docs.get(section_docs[section], "").replace("\n", "\n  "))
        for opt in opts.values():
            if opt.base is bool:
                usage = f"{opt.flag} / {opt.negative_flag}"
            else:
                usage = f"{opt.flag} {'|'.join(opt.choices) or METAVARS[opt.base]}"
            if opt.dotted in values:
                value, source = values[opt.dotted]
                usage += f" = {value_text(opt, value)} (from {source}; default: {_default_text(opt)})"
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


# The config file itself, and the [training] aliases of [debug] seed / deterministic (which [debug] carries).
_NOT_WRITTEN = ("job.config_file", "training.seed", "training.deterministic")


def config_to_toml(cfg: JobConfig) -> str:
    """The config as a TOML file that ``--job.config_file`` reads back to the same values.

    None values (TOML has no null), ``job.config_file`` and the ``[training]`` spellings of ``[debug] seed`` and
    ``deterministic`` are left out.
    """
    lines = ["# Resolved savepoint config. Re-run with: --job.config_file <this file>"]
    for section, opts in options().items():
        lines += ["", f"[{section}]"]
        values = holder(cfg, section)
        for name, opt in opts.items():
            value = getattr(values, name)
            if value is None or opt.dotted in _NOT_WRITTEN:
                continue
            lines.append(f"{name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
