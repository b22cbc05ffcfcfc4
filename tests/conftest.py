"""Shared helpers: small, fast job configs and in-process trainers."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from savepoint import cli
from savepoint.checkpoint import lock as lock_module
from savepoint.checkpoint import planner
from savepoint.job import parse_args

# The debug model's matrices are far below the 1 MiB tile threshold; lower it so that every
# checkpoint the tests write (and reshard) stores its matrices as column tiles.
planner.MIN_TILE_BYTES = 16 * 1024

ROOT = Path(__file__).resolve().parent.parent

# A job small enough that a step takes a few milliseconds, with a real LR schedule.
FAST_ARGS = [
    "--training.seq_len", "32", "--training.local_batch_size", "2", "--training.steps", "20",
    "--lr_scheduler.warmup_steps", "3", "--lr_scheduler.decay_ratio", "0.5",
    "--checkpoint.enable", "--checkpoint.interval", "5", "--checkpoint.no_last_save_model_only",
    "--metrics.log_freq", "1",
]


def make_config(dump_folder: Path, *overrides: str):
    argv = ["--job.config_file", str(ROOT / "configs" / "debug_model.toml"), "--job.dump_folder",
            str(dump_folder), *FAST_ARGS, *overrides]
    return parse_args(argv, environ={})


def losses(dump_folder: Path) -> dict[int, float]:
    """step -> loss from the job's metrics.jsonl (later runs overwrite earlier entries)."""
    lines = (Path(dump_folder) / "metrics.jsonl").read_text().splitlines()
    return {rec["step"]: rec["loss"] for rec in map(json.loads, lines)}


@pytest.fixture
def train(tmp_path):
    """``train(*overrides, dump=..., stop_after=...)`` runs an in-process Trainer and returns it."""
    from savepoint.train import Trainer

    def run(*overrides: str, dump: Path | None = None, stop_after: int | None = None):
        trainer = Trainer(make_config(dump or tmp_path / "run", *overrides))
        try:
            trainer.train(stop_after=stop_after)
        finally:
            # The next job on this folder may start now (as close() would allow), while the trainer
            # stays open for the test to inspect.
            if trainer.checkpointer.lock is not None:
                trainer.checkpointer.lock.release()
        return trainer

    return run


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``savepoint <argv>`` in this process; returns (exit code, stdout, stderr)."""
    logger = logging.getLogger("savepoint")
    handlers = list(logger.handlers)
    capsys.readouterr()
    try:
        code = cli.main(argv)
    finally:
        for handler in logger.handlers[len(handlers):]:  # main() adds one per call, bound to capsys' stdout
            logger.removeHandler(handler)
        lock_module._release_all()  # a failed run leaves its manager open: drop its lock as its exit would
    out = capsys.readouterr()
    return code, out.out, out.err


# ---- Hugging Face models for the conversion tests (see convert_support.py) -------------------------


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """(HF model, its saved folder) for TINY."""
    from tests.convert_support import TINY, hf_model

    model = hf_model(TINY)
    folder = tmp_path_factory.mktemp("tiny") / "hf"
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def debug_hf(tmp_path_factory) -> Path:
    """An HF folder of the real ``debugmodel`` flavor (for the scripts, which only know real flavors)."""
    from tests.convert_support import DEBUG, hf_model

    folder = tmp_path_factory.mktemp("debug") / "hf"
    hf_model(DEBUG, seed=1).save_pretrained(folder)
    return folder


@pytest.fixture
def flavors(monkeypatch):
    """Register extra flavors for the test: ``flavors(name=ModelArgs)``."""
    from savepoint.models.llama3.args import LLAMA3_FLAVORS

    def add(**extra) -> None:
        for name, args in extra.items():
            monkeypatch.setitem(LLAMA3_FLAVORS, name, args)
    return add
