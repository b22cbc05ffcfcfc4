"""What a training job reports: the step line on the log and ``<dump_folder>/metrics.jsonl``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch.distributed as dist

from savepoint.errors import CheckpointError, ConfigError
from savepoint.safe_io import open_append_regular

logger = logging.getLogger(__name__)


class MetricsLog:
    """Loss and friends, on the log and appended as JSON lines to ``<dump_folder>/metrics.jsonl``.

    The file is a regular file of its own: a symlink (or FIFO, device, folder) there is refused at
    start-up rather than written through. Once training runs, the log matters less than the
    checkpoints: a failed write (a full disk, the file replaced by a symlink) warns once and
    training goes on; later records are tried again.
    """

    def __init__(self, dump_folder: str, log_freq: int):
        self.path = Path(dump_folder) / "metrics.jsonl"
        self.log_freq = log_freq
        self.writes_file = not dist.is_initialized() or dist.get_rank() == 0  # values are global: one writer
        self.warned = False
        self.missing = 0  # records not written since the last successful write
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError([f"--job.dump_folder={dump_folder}: cannot create {self.path.parent} "
                               f"({e.strerror or e}); choose a folder you can write to"]) from None
        if self.writes_file:
            try:
                open_append_regular(self.path, "metrics log").close()
            except OSError as e:
                self._warn(f"cannot open {self.path} ({e.strerror or e})")

    def maybe_log(self, step: int, last_step: bool, record: dict) -> None:
        if step % self.log_freq and not last_step:
            return
        logger.info("step %5d  loss %.6f  lr %.3e  grad_norm %.4f  %.0f tok/s", step, record["loss"],
                    record["lr"], record["grad_norm"], record["tokens_per_second"])
        if self.writes_file:
            self._append(step, json.dumps({"step": step, **record}) + "\n")

    def _append(self, step: int, line: str) -> None:
        try:
            with open_append_regular(self.path, "metrics log") as f:
                f.write(line.encode("utf-8"))
        except (OSError, CheckpointError) as e:
            self._warn(f"step {step}: writing {self.path} failed ({getattr(e, 'strerror', None) or e})")
            self.missing += 1
            return
        if self.missing:
            logger.info("step %d: %s is writable again; the %d record(s) before this one are missing from it",
                        step, self.path, self.missing)
            self.missing = 0

    def _warn(self, what: str) -> None:
        if not self.warned:
            logger.warning("%s; training goes on and the metrics stay on this log (warned once; later records "
                           "are tried again)", what)
            self.warned = True
