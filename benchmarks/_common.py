"""What the benchmarks share: a quiet savepoint log, a temporary work folder, the page-cache drop,
the model options and presets, the states a checkpoint holds, and the report's cells and ratios.

Every benchmark runs as a script with the project's interpreter, from the repository root::

    bash scripts/bootstrap.sh                # once, in a fresh clone: .venv with savepoint installed (editable)
    .venv/bin/python benchmarks/NAME.py --help

A script's own folder comes first on ``sys.path``, which is how the benchmarks import this module
(and ``hashing_cost.py`` imports ``async_save.py``); savepoint itself comes from the venv.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from savepoint.checkpoint import CheckpointManager
from savepoint.checkpoint.states import LR_SCHEDULER, OPTIMIZER, TRAIN_STATE, LRSchedulerState, OptimizerState
from savepoint.config.job_config import Checkpoint
from savepoint.models.llama3.args import ModelArgs

DROP_CACHES = Path("/proc/sys/vm/drop_caches")


# ---- setup ----------------------------------------------------------------------------------


def quiet_savepoint_log() -> None:
    """Warnings and errors only: the manager logs every save and load at INFO."""
    logging.getLogger("savepoint").setLevel(logging.WARNING)


@contextlib.contextmanager
def work_folder(prefix: str, parent: str | None) -> Iterator[Path]:
    """A fresh temporary folder (under ``parent`` if given), announced, and removed at the end."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    print(f"benchmarking in {path}", flush=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def flush_page_cache(drop: bool) -> bool:
    """``sync``; then, if ``drop``, drop the page cache where the kernel allows it (root). True if it was dropped."""
    os.sync()
    if not drop:
        return False
    try:
        DROP_CACHES.write_text("3\n")
    except OSError:
        return False
    return True


def model_parser(doc: str, presets: dict[str, dict[str, int]], quick_help: str,
                 repeats_help: str) -> argparse.ArgumentParser:
    """Options every model benchmark takes: ``--quick``, ``--repeats``, the model's size (unset ones come from
    the preset, see ``apply_preset``) and ``--dir``; the description is the first paragraph of ``doc``."""
    default, quick = presets["default"], presets["quick"]
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--repeats", type=int, help=repeats_help)
    parser.add_argument("--dim", type=int, help=f"model width (default {default['dim']}, --quick {quick['dim']})")
    parser.add_argument("--n-layers", type=int, help=f"transformer blocks (default {default['n_layers']}, "
                                                     f"--quick {quick['n_layers']})")
    parser.add_argument("--vocab-size", type=int, help=f"vocabulary size (default {default['vocab_size']}, "
                                                       f"--quick {quick['vocab_size']})")
    parser.add_argument("--n-heads", type=int, default=16, help="attention heads (default 16)")
    parser.add_argument("--n-kv-heads", type=int, default=8, help="key/value heads (default 8)")
    parser.add_argument("--dir", help="parent folder of the temporary checkpoint folder (default: the system's)")
    return parser


def apply_preset(parser: argparse.ArgumentParser, args: argparse.Namespace, presets: dict[str, dict[str, int]]) -> None:
    """Fill the options left unset from the default or ``--quick`` preset, and check the model's shape."""
    for key, value in presets["quick" if args.quick else "default"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.dim % args.n_heads or (args.dim // args.n_heads) % 2:
        parser.error("--dim must be a multiple of --n-heads with an even head size (RoPE rotates pairs)")


def llama_args(args: argparse.Namespace, seq_len: int) -> ModelArgs:
    """The Llama 3 model the options describe."""
    return ModelArgs(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                     vocab_size=args.vocab_size, max_seq_len=seq_len)


def checkpoint_states(model: nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler: Any,
                      train_state: Any) -> dict[str, Any]:
    """The states a checkpoint holds besides the model, as ``Trainer`` hands them to the manager."""
    return {OPTIMIZER: OptimizerState(model, optimizer), LR_SCHEDULER: LRSchedulerState(lr_scheduler),
            TRAIN_STATE: train_state}


def keep_all_manager(work_dir: Path, folder: str, model: nn.Module, states: dict[str, Any],
                     async_mode: str = "disabled", **kwargs: Any) -> CheckpointManager:
    """A manager over ``work_dir/folder`` that saves every step and keeps all (the benchmark deletes)."""
    cfg = Checkpoint(enable=True, folder=folder, interval=1, keep_latest_k=0, last_save_model_only=False,
                     async_mode=async_mode)
    return CheckpointManager(cfg, str(work_dir), model, states=states, job_config={}, **kwargs)


# ---- report ---------------------------------------------------------------------------------


def timing_cells(seconds: list[float], nbytes: int | None, digits: int) -> str:
    """Table cells: the median of ``seconds``, their range, and the median's throughput over ``nbytes`` in GB/s."""
    median = statistics.median(seconds)
    spread = f"{min(seconds):.{digits}f} - {max(seconds):.{digits}f}"
    rate = f"{nbytes / 1e9 / median:>7.2f}" if nbytes else f"{'':>7}"
    return f"{median:>9.{digits}f} {spread:>17} {rate}"


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def ratio_line(name: str, num: list[float], den: list[float], target: float, per: str) -> tuple[str, float]:
    """``name: Rx (target <= Tx: met); per ... min - max``: the ratio of the medians, and of each pair."""
    ratio = statistics.median(num) / statistics.median(den)
    pairs = [a / b for a, b in zip(num, den, strict=True)]
    return (f"{name}: {ratio:.2f}x (target <= {target:.1f}x: {verdict(ratio <= target)}); "
            f"{per} {min(pairs):.2f}x - {max(pairs):.2f}x"), ratio


def cache_note(cold: bool, before: str, served: str) -> str:
    """How the timed calls met the page cache: dropped before ``before``, or warm (``served`` may come from memory)."""
    if cold:
        return f"cold (page cache synced and dropped before {before})"
    return f"warm cache (dropping the page cache was not permitted; {served} may be served from memory)"


def machine_note(cold: bool) -> str:
    return f"{'cold' if cold else 'warm'} cache, {os.cpu_count()} CPU cores, torch {torch.__version__}"
