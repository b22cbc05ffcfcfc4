"""The ``savepoint`` command. The only place that configures logging or exits the process.

    savepoint train [--section.key value ...]   train (run_train.sh launches this under torchrun)
    savepoint check [--section.key value ...]   validate a config without importing torch
    savepoint inspect FOLDER|STEP_DIR           list committed steps and what they hold
    savepoint verify FOLDER|STEP_DIR            check every file against the checksums saved with it
    savepoint convert from_hf|to_hf IN OUT --model_flavor F [--hf_assets_path P] [--export_dtype D]
                                                offline HF <-> DCP conversion
    savepoint convert to_torchtune STEP_DIR OUT.pt --model_flavor F [--dtype D]
                                                a step's weights as a torchtune .pt
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from savepoint.errors import SavepointError

USAGE = __doc__


def setup_logging() -> None:
    rank = os.environ.get("RANK", "0")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"[rank{rank}] %(asctime)s %(levelname)s %(name)s: %(message)s",
                                           datefmt="%H:%M:%S"))
    root = logging.getLogger("savepoint")
    for old in [h for h in root.handlers if getattr(h, "savepoint_cli", False)]:
        root.removeHandler(old)  # main() called again in one process (tests, tools): one handler, current stdout
    handler.savepoint_cli = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if os.environ.get("SAVEPOINT_DEBUG") else logging.INFO)


def _parse_config(argv: list[str]):
    from savepoint.config import help_text, parse_args, wants_help

    if wants_help(argv):
        print(help_text())
        sys.exit(0)
    return parse_args(argv)


def cmd_train(argv: list[str]) -> None:
    cfg = _parse_config(argv)
    from savepoint.train import run

    run(cfg)


def cmd_check(argv: list[str]) -> None:
    """Validate the config; with SAVEPOINT_WORLD_SIZE set (run_train.sh sets it to NGPU), the layout too."""
    cfg = _parse_config(argv)
    world_size = os.environ.get("SAVEPOINT_WORLD_SIZE")
    if world_size:
        from savepoint.config.layout import resolve_parallel_dims

        resolve_parallel_dims(cfg, int(world_size))


def cmd_inspect(argv: list[str]) -> None:
    from savepoint.inspect import describe

    if len(argv) != 1:
        raise SavepointError("usage: savepoint inspect FOLDER|STEP_DIR")
    print(describe(argv[0]))


def cmd_verify(argv: list[str]) -> None:
    """Verify each step; prints one line per step and fails (exit 1) if any is damaged."""
    from savepoint.checkpoint.integrity import step_dirs, verify_step

    if len(argv) != 1:
        raise SavepointError("usage: savepoint verify FOLDER|STEP_DIR")
    steps = step_dirs(argv[0])
    if not steps:
        raise SavepointError(f"{argv[0]} holds no step-N folder to verify")
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
    if argv and argv[0] == "to_torchtune":
        from savepoint.hf.torchtune import main as to_torchtune

        to_torchtune(argv[1:])
        return
    from savepoint.hf.convert import run

    run(argv)


COMMANDS = {"train": cmd_train, "check": cmd_check, "inspect": cmd_inspect, "verify": cmd_verify, "convert": cmd_convert}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("SAVEPOINT_DEBUG"))
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] not in COMMANDS:
        print(USAGE.strip(), file=sys.stderr if argv else sys.stdout)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    setup_logging()
    # DCP warns on every save and load outside a process group (a one-process job); that is the intent,
    # and on stderr it would bury the one "error:" line a failure prints.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
    try:
        COMMANDS[argv[0]](argv[1:])
    except SavepointError as e:
        if debug:
            raise
        rank = os.environ.get("RANK")
        prefix = f"[rank{rank}] " if rank not in (None, "0") else ""
        print(f"{prefix}error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
