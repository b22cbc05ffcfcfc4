"""What both trial harnesses share: the debug job's command line, a quiet savepoint log, the CLI's end."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CONFIG_FILE = ROOT / "configs" / "debug_model.toml"


def job_argv(dump: Path, *, steps: int, keep: int, warmup_steps: int, interval: int = 1,
             extra: tuple[str, ...] = ()) -> list[str]:
    """The debug model's job: tiny batches, full checkpoints every ``interval`` steps, the newest ``keep`` kept."""
    return ["--job.config_file", str(CONFIG_FILE), "--job.dump_folder", str(dump),
            "--training.seq_len", "32", "--training.local_batch_size", "2", "--training.steps", str(steps),
            "--lr_scheduler.warmup_steps", str(warmup_steps), "--checkpoint.enable",
            "--checkpoint.interval", str(interval), "--checkpoint.keep_latest_k", str(keep),
            "--checkpoint.no_last_save_model_only", "--metrics.log_freq", "1", *extra]


@contextlib.contextmanager
def quiet_log(level: int, handler: logging.Handler | None = None) -> Iterator[logging.Logger]:
    """The ``savepoint`` logger at ``level``, kept off the console (to ``handler`` only, if given), then restored."""
    log = logging.getLogger("savepoint")
    saved = log.level, log.propagate
    if handler is not None:
        log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
    try:
        yield log
    finally:
        if handler is not None:
            log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]


def finish(report: str, counts: dict[str, Any], json_path: str | None, failed: bool) -> int:
    """Print a campaign's report, write its counts to ``json_path`` if given; the exit code (1: a trial failed)."""
    print(report)
    if json_path:
        Path(json_path).write_text(json.dumps(counts, indent=2))
    return 1 if failed else 0
