"""The ``savepoint`` command: the only place that configures logging or exits the process.

Help (``--help``, ``-h``, or no arguments) goes to stdout with exit 0; every failure is one
``error: ...`` line on stderr with exit 1.
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
import warnings

from savepoint.errors import ConfigError, SavepointError

# command -> (arguments, what it does); the order is the order of `savepoint --help`.
COMMAND_HELP = {
    "train": ("[--section.key value ...]", "train (run_train.sh launches this under torchrun)"),
    "check": ("[--section.key value ...]", "validate a config without importing torch"),
    "inspect": ("FOLDER|STEP_DIR", "list committed steps and what they hold"),
    "verify": ("FOLDER|STEP_DIR", "check every file against the checksums saved with it"),
    "convert": ("from_hf|to_hf|to_torchtune ...", "convert between DCP, Hugging Face and torchtune"),
    "plot": ("DUMP_FOLDER [-o OUT.png]", "plot loss and lr against step, marking saves and resumes"),
}

USAGE = "usage: savepoint COMMAND [ARGS]\n\n" + "\n".join(
    f"    savepoint {name + ' ' + args:<42} {what}" for name, (args, what) in COMMAND_HELP.items()
) + "\n\n`savepoint COMMAND --help` describes a command. --debug (or SAVEPOINT_DEBUG=1) shows tracebacks."

CONVERT_USAGE = """\
usage: savepoint convert from_hf IN_DIR OUT_DIR [--model_flavor F] [--dtype D]
       savepoint convert to_hf STEP_DIR OUT_DIR [--model_flavor F] [--hf_assets_path P] [--export_dtype D]
                                                [--max_shard_size S]
       savepoint convert to_torchtune STEP_DIR OUT.pt --model_flavor F [--dtype D]

    from_hf        a Hugging Face Llama 3 folder -> a model-only DCP step folder
    to_hf          a DCP step folder -> a complete Hugging Face folder (safetensors, config, tokenizer)
    to_torchtune   a DCP step folder's weights -> a torchtune .pt file

`savepoint convert DIRECTION --help` lists a direction's options."""

CONVERSIONS = ("from_hf", "to_hf", "to_torchtune")
HELP_FLAGS = ("-h", "--help")


LEVEL_COLORS = {"DEBUG": "\033[36m", "INFO": "\033[32m", "WARNING": "\033[33m", "ERROR": "\033[31m",
                "CRITICAL": "\033[1;31m"}


class LogFormatter(logging.Formatter):
    """``[rankN] time LEVEL name: message``; the level name in color when ``color`` is set (a terminal)."""

    def __init__(self, rank: str, color: bool):
        super().__init__(f"[rank{rank}] %(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        self.color = color

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        if not self.color or record.levelname not in LEVEL_COLORS:
            return super().formatMessage(record)
        plain = record.levelname
        record.levelname = f"{LEVEL_COLORS[plain]}{plain}\033[0m"
        try:
            return super().formatMessage(record)
        finally:
            record.levelname = plain


def set_color(enabled: bool) -> None:
    """Color the level names of savepoint's log lines if ``enabled`` and stdout is a terminal (never otherwise)."""
    for handler in logging.getLogger("savepoint").handlers:
        if getattr(handler, "savepoint_cli", False) and isinstance(handler.formatter, LogFormatter):
            isatty = getattr(handler.stream, "isatty", None)
            handler.formatter.color = enabled and bool(isatty and isatty())


def setup_logging() -> None:
    rank = os.environ.get("RANK", "0")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(LogFormatter(rank, color=False))
    root = logging.getLogger("savepoint")
    for old in [h for h in root.handlers if getattr(h, "savepoint_cli", False)]:
        root.removeHandler(old)  # main() called again in one process (tests, tools): one handler, current stdout
    handler.savepoint_cli = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if os.environ.get("SAVEPOINT_DEBUG") else logging.INFO)
    set_color(True)  # on a terminal; a job's --metrics.disable_color_printing turns it off


def _parse_config(argv: list[str], prog: str):
    from savepoint.config import help_text, wants_help
    from savepoint.job import parse_args

    if wants_help(argv):
        print(help_text(prog, argv=argv, environ=os.environ))  # this job's values next to the defaults
        sys.exit(0)
    return parse_args(argv)


def _one_path(argv: list[str], command: str) -> str | None:
    """The one FOLDER|STEP_DIR argument of inspect/verify; None after printing the help it asked for."""
    args, what = COMMAND_HELP[command]
    usage = f"usage: savepoint {command} {args}"
    if len(argv) == 1 and argv[0] in HELP_FLAGS:
        print(f"{usage}\n\n{what}.")
        return None
    if len(argv) != 1:
        raise SavepointError(f"{usage} (one path, got {len(argv)} arguments)")
    from savepoint.config.problems import url_problem

    for line in url_problem(f"savepoint {command}", argv[0], sep=" ", s3=True):
        raise SavepointError(line)
    return argv[0]


def cmd_train(argv: list[str]) -> None:
    cfg = _parse_config(argv, "savepoint train")
    set_color(not cfg.metrics.disable_color_printing)
    from savepoint.train import run

    run(cfg)


def cmd_check(argv: list[str]) -> None:
    """Validate the config; with SAVEPOINT_WORLD_SIZE set (run_train.sh sets it to NGPU), the layout too."""
    cfg = _parse_config(argv, "savepoint check")
    world_size = os.environ.get("SAVEPOINT_WORLD_SIZE")
    if world_size:
        from savepoint.job import resolve_parallel_dims

        if not world_size.isdecimal() or int(world_size) < 1:
            raise ConfigError([f"SAVEPOINT_WORLD_SIZE={world_size!r}: it must be the number of training processes "
                               "(1 or more), as run_train.sh sets it from NGPU; unset it to check only the config"])
        resolve_parallel_dims(cfg, int(world_size))


def cmd_inspect(argv: list[str]) -> None:
    """Print the summary; fails (exit 1) if a step of the folder cannot be read, after listing the rest."""
    path = _one_path(argv, "inspect")
    if path is None:
        return
    from savepoint.inspect import describe

    text, unreadable = describe(path)
    print(text, flush=True)
    if unreadable:
        raise SavepointError(f"{len(unreadable)} step(s) of {path} cannot be read: {', '.join(unreadable)} (why is "
                             f"listed above); `savepoint verify {path}` checks every file")


def cmd_verify(argv: list[str]) -> None:
    """Verify each step; prints one line per step and fails (exit 1) if any is damaged."""
    path = _one_path(argv, "verify")
    if path is None:
        return
    from savepoint.checkpoint.verify import step_dirs, verify_step

    steps = step_dirs(path)
    if not steps:
        raise SavepointError(f"{path} holds no step-N folder to verify")
    bad = []
    for step_dir in steps:
        report = verify_step(step_dir)
        if report.ok:
            how = f"checksums match ({report.checked_bytes / 1e6:.1f} MB read)" if report.verified else \
                "structure OK, no checksums to check"
            print(f"{step_dir}: OK, {how}")
        else:
            bad.append(step_dir)
            print(f"{step_dir}: CORRUPT: {report.problems[0]}")
            for problem in report.problems[1:]:
                print(f"  also: {problem}")
        for note in report.notes:
            print(f"  note: {note}")
    if bad:
        raise SavepointError(f"{len(bad)} of {len(steps)} step(s) failed verification: "
                             f"{', '.join(p.name for p in bad)}")


def cmd_convert(argv: list[str]) -> None:
    if not argv or argv[0] in HELP_FLAGS:
        print(CONVERT_USAGE)
        return
    if argv[0] not in CONVERSIONS:
        raise SavepointError(_unknown("conversion", argv[0], CONVERSIONS, "savepoint convert --help"))
    if argv[0] == "to_torchtune":
        from savepoint.convert.torchtune import main as to_torchtune

        to_torchtune(argv[1:])
        return
    from savepoint.convert.cli import run

    run(argv)


def cmd_plot(argv: list[str]) -> None:
    from savepoint.plot import main as plot

    plot(argv)


COMMANDS = {"train": cmd_train, "check": cmd_check, "inspect": cmd_inspect, "verify": cmd_verify,
            "convert": cmd_convert, "plot": cmd_plot}


def _unknown(what: str, given: str, known: tuple[str, ...] | list[str], help_command: str) -> str:
    shown = ascii(given) if not given.isprintable() else f"'{given}'"
    close = difflib.get_close_matches(given, known, n=1)
    if close:
        return f"unknown {what} {shown}; did you mean {close[0]}? ({help_command} lists them)"
    return f"unknown {what} {shown}: it is one of {', '.join(known)} ({help_command} describes them)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("SAVEPOINT_DEBUG"))
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in HELP_FLAGS:
        print(USAGE)
        return 0
    if argv[0] not in COMMANDS:
        print(f"error: {_unknown('command', argv[0], list(COMMANDS), 'savepoint --help')}", file=sys.stderr)
        return 1
    setup_logging()
    # DCP warns on every save and load outside a process group (a one-process job); that is the intent,
    # and on stderr it would bury the one "error:" line a failure prints.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
    rank = os.environ.get("RANK")
    prefix = f"[rank{rank}] " if rank not in (None, "0") else ""
    try:
        COMMANDS[argv[0]](argv[1:])
    except SavepointError as e:
        if debug:
            raise
        print(f"{prefix}error: {e}", file=sys.stderr, flush=True)
        return 1
    except BaseException as e:  # DCP's CheckpointException, which wraps a collective's error, is one
        lost = peer_lost(e)
        if debug or lost is None:
            raise
        first = str(lost).strip().splitlines()[0][:300] if str(lost).strip() else type(lost).__name__
        print(f"{prefix}error: another rank of the job is gone (its process died; the launcher names it), so this "
              f"rank stops too ({first})", file=sys.stderr, flush=True)
        return 1
    return 0


# How a collective reports that the peer process at the other end died.
PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")


def peer_lost(error: BaseException | None) -> BaseException | None:
    """The gloo error behind ``error`` if it is a collective failing because another rank's process is gone
    (itself, its causes, or the failing rank's error DCP wrapped), else None."""
    for _ in range(10):
        if error is None:
            return None
        text = str(error)
        if isinstance(error, RuntimeError) and "gloo" in text and any(t in text for t in PEER_LOST):
            return error
        failures = getattr(error, "failures", None)  # DCP's CheckpointException: rank -> (error, traceback)
        if isinstance(failures, dict) and failures:
            inner = next(iter(failures.values()))
            error = inner[0] if isinstance(inner, tuple) else inner
        else:
            error = error.__cause__ or error.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
