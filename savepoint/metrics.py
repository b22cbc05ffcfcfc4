"""What a training job reports: the step line on the log, ``<dump_folder>/metrics.jsonl``, and
optionally TensorBoard event files and an offline Weights & Biases run.

Each step line shows the loss, learning rate, gradient norm, throughput (tokens/s per rank), the
model FLOPs achieved (TFLOPS, and MFU where the device's peak is known) and the peak memory so far.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from savepoint.errors import CheckpointError, ConfigError
from savepoint.safe_io import open_append_regular

logger = logging.getLogger(__name__)

GIB = 1024 ** 3

# Dense BF16 peak FLOPS (without sparsity) by device name, most specific name first.
PEAK_FLOPS: list[tuple[str, float]] = [
    ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("H20", 148e12),
    ("A100", 312e12), ("B200", 2.25e15), ("MI355X", 2500e12), ("MI325X", 1300e12), ("MI300X", 1300e12),
    ("MI250X", 191.5e12),
]


@dataclass
class MetricsOptions:
    """The [metrics] keys this module reads (the config's ``Metrics`` section has them all)."""

    log_freq: int = 10
    enable_tensorboard: bool = False
    save_tb_folder: str = "tb"
    save_for_all_ranks: bool = False
    enable_wandb: bool = False


def flops_per_token(args: Any, seq_len: int) -> tuple[int, int]:
    """(parameter count, training FLOPs per token) of a Llama 3 model with ``args`` (a ``ModelArgs``).

    FLOPs: 6 per non-embedding parameter (forward 2, backward 4) plus the attention matmuls,
    ``6 * n_layers * n_heads * (2 * head_dim) * seq_len`` (scores and values; causality ignored,
    recomputation not counted), the convention MFU figures use.
    """
    dim, head_dim, kv = args.dim, args.head_dim, args.num_kv_heads
    attention = 2 * dim * dim + 2 * dim * kv * head_dim  # wq, wo; wk, wv
    feed_forward = 3 * dim * args.ffn_hidden_dim  # w1, w2, w3
    per_layer = attention + feed_forward + 2 * dim  # and the two RMSNorm weights
    embedding = args.vocab_size * dim
    non_embedding = args.n_layers * per_layer + dim + dim * args.vocab_size  # final norm, output projection
    flops = 6 * non_embedding + 6 * args.n_layers * args.n_heads * 2 * head_dim * seq_len
    return non_embedding + embedding, flops


def peak_flops(device: torch.device) -> float | None:
    """The device's dense BF16 peak FLOPS, if it is a device this table knows; None otherwise (CPU too)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


def peak_flops_of(device_name: str) -> float | None:
    """The dense BF16 peak FLOPS of the device named ``device_name`` (as CUDA names it); None if unknown."""
    return next((flops for key, flops in PEAK_FLOPS if key in device_name), None)


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(GiB, what was measured): CUDA's max allocated on a GPU, else the process's peak resident set size."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / GIB, "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024) / GIB, "max_rss"  # bytes on macOS, KiB on Linux


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class TensorBoardLog:
    """Scalars to TensorBoard event files in ``folder`` (flushed at every record, so a crash loses none)."""

    def __init__(self, folder: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(["--metrics.enable_tensorboard: the tensorboard package is not installed; "
                               "pip install 'savepoint[metrics]' (or tensorboard), or leave enable_tensorboard "
                               "off"]) from None
        self.folder = folder
        self.writer = SummaryWriter(str(folder), max_queue=1000)
        logger.info("TensorBoard event files go to %s", folder)

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLog:
    """An offline Weights & Biases run under ``<dump_folder>/wandb`` (``wandb sync`` uploads it later)."""

    def __init__(self, folder: Path):
        try:
            import wandb
        except ImportError:
            raise ConfigError(["--metrics.enable_wandb: the wandb package is not installed; pip install wandb, "
                               "or leave enable_wandb off"]) from None
        os.environ.setdefault("WANDB_MODE", "offline")
        folder.mkdir(parents=True, exist_ok=True)
        self.wandb = wandb
        self.run = wandb.init(dir=str(folder), project=os.environ.get("WANDB_PROJECT", "savepoint"),
                              name=os.environ.get("WANDB_RUN_NAME"))
        logger.info("Weights & Biases run in %s (WANDB_MODE=%s)", folder, os.environ["WANDB_MODE"])

    def log(self, values: dict[str, float], step: int) -> None:
        self.wandb.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricsLog:
    """Loss and friends, on the log and appended as JSON lines to ``<dump_folder>/metrics.jsonl``.

    The file is a regular file of its own: a symlink (or FIFO, device, folder) there is refused at
    start-up rather than written through. Once training runs, the log matters less than the
    checkpoints: a failed write (a full disk, the file replaced by a symlink) warns once and
    training goes on; later records are tried again.

    ``options`` is the [metrics] section; ``model_args``, ``seq_len`` and ``device`` give the FLOPs
    and memory figures (without ``model_args`` the step line has no TFLOPS). A resume
    (:meth:`resumed`) and the saves that commit (:meth:`committed`) are noted in the next record
    written (``resumed_from``, ``saved_steps``) and as TensorBoard scalars at their steps.
    """

    def __init__(self, dump_folder: str, log_freq: int, options: Any = None, *, model_args: Any = None,
                 seq_len: int | None = None, device: torch.device | None = None):
        options = options or MetricsOptions(log_freq=log_freq)
        self.path = Path(dump_folder) / "metrics.jsonl"
        self.log_freq = log_freq
        self.device = device or torch.device("cpu")
        self.flops = flops_per_token(model_args, seq_len or model_args.max_seq_len)[1] if model_args else None
        self.peak_flops = peak_flops(self.device)
        self.writes_file = _rank() == 0  # values are global: one writer
        self.warned = False
        self.missing = 0  # records not written since the last successful write
        self.pending: dict[str, Any] = {}  # resume and saves, for the next record written
        self.last_commit: int | None = None
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
        self.sinks: list[TensorBoardLog | WandbLog] = []
        if options.enable_tensorboard and (self.writes_file or options.save_for_all_ranks):
            tb = Path(dump_folder) / options.save_tb_folder
            self.sinks.append(TensorBoardLog(tb / f"rank_{_rank()}" if options.save_for_all_ranks else tb))
        if options.enable_wandb and self.writes_file:
            self.sinks.append(WandbLog(Path(dump_folder) / "wandb"))

    def maybe_log(self, step: int, last_step: bool, record: dict) -> None:
        if step % self.log_freq and not last_step:
            return
        record = {**record, **self._performance(record["tokens_per_second"])}
        logger.info("%s", self.step_line(step, record))
        if self.writes_file:
            self._append(step, json.dumps({"step": step, **record, **self.pending}) + "\n")
        self.pending = {}
        self._to_sinks(step, {key: record[key] for key in ("loss", "lr", "grad_norm", "tokens_per_second",
                                                           "tflops", "mfu_pct", "memory_gib") if key in record})

    def step_line(self, step: int, record: dict) -> str:
        line = (f"step {step:5d}  loss {record['loss']:.6f}  lr {record['lr']:.3e}  grad_norm "
                f"{record['grad_norm']:.4f}  {record['tokens_per_second']:.0f} tok/s")
        if "tflops" in record:
            line += f"  {record['tflops']:.3g} TFLOPS"
        if "mfu_pct" in record:
            line += f"  mfu {record['mfu_pct']:.2f}%"
        kind = "max allocated" if record["memory_kind"] == "cuda_max_allocated" else "peak rss"
        return line + f"  memory {record['memory_gib']:.2f} GiB ({kind})"

    def _performance(self, tokens_per_second: float) -> dict[str, Any]:
        gib, kind = peak_memory(self.device)
        out: dict[str, Any] = {"memory_gib": gib, "memory_kind": kind}
        if self.flops is not None:
            out["tflops"] = self.flops * tokens_per_second / 1e12
            if self.peak_flops:
                out["mfu_pct"] = 100 * self.flops * tokens_per_second / self.peak_flops
        return out

    def resumed(self, step: int | None) -> None:
        """The job resumed from checkpoint step ``step`` (None: it started fresh)."""
        if step is None:
            return
        self.last_commit = step  # already committed: not a save of this job
        self.pending["resumed_from"] = step
        self._to_sinks(step, {"checkpoint/resumed_step": step})

    def committed(self, step: int | None) -> None:
        """The newest step committed so far (call after each step); a new one is logged as a save."""
        if step is None or step == self.last_commit:
            return
        self.last_commit = step
        self.pending.setdefault("saved_steps", []).append(step)
        self._to_sinks(step, {"checkpoint/saved_step": step})

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []

    def _to_sinks(self, step: int, values: dict[str, float]) -> None:
        for sink in self.sinks:
            sink.log(values, step)

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
