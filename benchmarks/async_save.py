"""Benchmark: what an async save costs the training loop, against the disk, memcpy, torch.save and sync saves.

    .venv/bin/python benchmarks/async_save.py            # Llama 3 of ~89M parameters + AdamW (~1.07 GB), ~4 min
    .venv/bin/python benchmarks/async_save.py --quick    # a small smoke run (~30 s)

Disk speed on shared machines swings several-fold between runs, so every number compared here is
measured in one invocation, in one process (a 1-rank gloo process group, which
``async_with_pinned_mem`` needs for its writer process). The rows:

- the floor: sequential write of a file of the state's size in 64 MiB blocks + fdatasync, its cold
  read back, and ``dst.copy_(src)`` of the state's size into a preallocated buffer;
- the same state (model + AdamW, exactly what the manager saves) with ``torch.save`` + fsync, with
  raw ``dcp.save`` (default planner, ``no_dist=True``), with the same ``dcp.save`` through
  savepoint's ``HashingWriter`` twice (as savepoint uses it, without torch.save's zip CRC-32, and
  with the CRC-32 kept as raw ``dcp.save`` computes it: the difference to raw ``dcp.save`` is the
  hashing cost), and with savepoint's sync save (durable and committed). These six take turns, the
  order rotating every repeat, so that disk drift favours none;
- ``async`` and ``async_with_pinned_mem``, each with its own manager: ``--saves`` consecutive saves
  with no training in between (save, ``wait_for_staging()``, ``finish_inflight()``; the first save
  is reported apart, as it allocates the staging buffers and, for the writer process, spawns it),
  reading VmRSS after each; then ``--repeats`` saves inside a training loop (a real forward,
  backward and AdamW step of the model on a batch sized so that a step takes about 0.25 s), where
  the training loop is blocked by the ``save()`` call plus the ``wait_for_staging()`` wait before the
  next ``optimizer.step()``, and every step that starts while the save is in flight is timed against
  steps with no save in flight.

Memory: VmRSS counts a shared-memory page once in every process that maps it, so the staging
buffers of ``async_with_pinned_mem`` (shared with the writer process) appear in both. The report
also gives PSS (``/proc/PID/smaps_rollup``, which splits a shared page among the processes mapping
it): the trainer's PSS plus the writer's, after the saves, minus the trainer's before them, is the
memory the saves really added.

Before each timed save or disk pass the page cache is synced and dropped when the kernel allows it
(root); otherwise the output says the cache was warm. Checkpoints live in a temporary folder (under
``--dir`` if given) that is removed at the end.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.checkpoint.stateful import Stateful  # noqa: E402

from savepoint.checkpoint import CheckpointManager, staging  # noqa: E402
from savepoint.checkpoint.hashing import HashingWriter  # noqa: E402
from savepoint.checkpoint.states import (  # noqa: E402
    LR_SCHEDULER,
    OPTIMIZER,
    TRAIN_STATE,
    LRSchedulerState,
    ModelState,
    OptimizerState,
    TrainState,
)
from savepoint.checkpoint.storage import folder_bytes  # noqa: E402
from savepoint.config.job_config import Checkpoint, Comm, LRScheduler, Optimizer  # noqa: E402
from savepoint.distributed import init_distributed  # noqa: E402
from savepoint.models.llama3.args import ModelArgs  # noqa: E402
from savepoint.models.llama3.model import build_model  # noqa: E402
from savepoint.optim import build_lr_scheduler, build_optimizer  # noqa: E402

if __name__ == "__mp_main__":  # this file imported by the spawned writer process of async_with_pinned_mem
    import torch.distributed.checkpoint._async_process_executor as _executor

    _executor._init_logger = lambda rank: None  # it logs every request at INFO; warnings and errors still show

SEED = 0
SEQ_LEN = 64  # tokens per sequence of the training step; the batch size is calibrated
BLOCK = 64 << 20  # the disk pass writes and reads in 64 MiB blocks
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
CLEAR_REFS = Path("/proc/self/clear_refs")  # writing "5" resets VmHWM (peak RSS)
STEP_TARGET_S = 0.25  # the batch doubles until one training step takes at least this long
MAX_BATCH = 64
MAX_STEPS_PER_SAVE = 200  # safety cap on training steps run while one save is in flight
ASYNC_MODES = ("async", "async_with_pinned_mem")
# Targets: blocked / durable sync save, sync save throughput / disk write, sync / torch.save+fsync,
# step during a save / normal step.
BLOCKED_TARGET = 0.005
THROUGHPUT_TARGET = 0.90
VS_TORCH_TARGET = 1.0
STEP_TARGET = 1.25
MEMORY_TARGET = 1.0  # memory the saves add, trainer + writer process (PSS), per byte of state
HASHING_TARGET = 0.05  # hashing costs at most 5 % of a durable save
# Model size and repeats: the default run (about 1.07 GB of state) and --quick.
PRESETS = {
    "default": {"dim": 1024, "n_layers": 2, "vocab_size": 32000, "repeats": 3, "saves": 50},
    "quick": {"dim": 256, "n_layers": 2, "vocab_size": 8192, "repeats": 2, "saves": 8},
}


# ---- measuring -------------------------------------------------------------------------------


class Clock:
    """Syncs and drops the page cache before a timed call; ``cold`` stays True while every drop succeeded."""

    def __init__(self) -> None:
        self.cold = True

    def flush(self) -> None:
        os.sync()
        if self.cold:
            try:
                DROP_CACHES.write_text("3\n")
            except OSError:
                self.cold = False

    def time(self, call: Callable[[], object]) -> float:
        """Seconds ``call()`` takes, started on a synced (and, if allowed, dropped) page cache."""
        self.flush()
        start = time.perf_counter()
        call()
        return time.perf_counter() - start


def _kb_fields(path: str) -> dict[str, int]:
    """The ``Name: N kB`` lines of a /proc file, in bytes; {} if unreadable."""
    fields = {}
    try:
        for line in Path(path).read_text().splitlines():
            key, _, value = line.partition(":")
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB":
                fields[key] = int(parts[0]) * 1024
    except OSError:
        pass
    return fields


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """The ``kB`` fields of /proc/PID/status (VmRSS, VmHWM, RssShmem, ...), in bytes."""
    return _kb_fields(f"/proc/{pid}/status")


def proc_pss(pid: int | str = "self") -> dict[str, int]:
    """The ``kB`` fields of /proc/PID/smaps_rollup (Rss, Pss, Pss_Anon, Pss_Shmem, ...), in bytes; {} if unreadable."""
    return _kb_fields(f"/proc/{pid}/smaps_rollup")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        CLEAR_REFS.write_text("5\n")
        return True
    except OSError:
        return False


def child_pids() -> list[int]:
    """This process's children (the writer process of ``async_with_pinned_mem``, once spawned)."""
    pids: list[int] = []
    for task in Path("/proc/self/task").iterdir():
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return pids


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a nested dict/list state."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0


# ---- the job --------------------------------------------------------------------------------


@dataclass
class Job:
    """One model on one process, a few AdamW steps into training, and the states a checkpoint holds."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    train_state: TrainState
    states: dict[str, Any]
    tokens: torch.Tensor = field(default_factory=lambda: torch.empty(0))

    def manager(self, work_dir: Path, folder: str, async_mode: str) -> CheckpointManager:
        """A manager over ``work_dir/folder`` that saves every step and keeps all (the benchmark deletes)."""
        cfg = Checkpoint(enable=True, folder=folder, interval=1, keep_latest_k=0, last_save_model_only=False,
                         async_mode=async_mode)
        return CheckpointManager(cfg, str(work_dir), self.model, states=self.states, job_config={})

    def state(self) -> dict[str, Any]:
        """The state dict the manager's save writes: model tensors flat, then each component's state."""
        return {k: v.state_dict() if isinstance(v, Stateful) else v
                for k, v in {**ModelState(self.model).state_dict(), **self.states}.items()}

    def step(self, before_optimizer: Callable[[], None] = lambda: None) -> tuple[float, float]:
        """One training step; returns (seconds without the ``before_optimizer`` call, seconds in it)."""
        start = time.perf_counter()
        logits = self.model(self.tokens[:, :-1])  # [batch, SEQ_LEN, vocab_size]
        F.cross_entropy(logits.flatten(0, 1).float(), self.tokens[:, 1:].flatten()).backward()
        wait_start = time.perf_counter()
        before_optimizer()
        waited = time.perf_counter() - wait_start
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.train_state.step += 1
        return time.perf_counter() - start - waited, waited


def build_job(model_args: ModelArgs) -> Job:
    """Build the model as ``Trainer.__init__`` does on one process; the first step creates the AdamW state."""
    model = build_model(model_args, seed=SEED, device=torch.device("cpu"))
    optimizer = build_optimizer(model, Optimizer())
    lr_scheduler = build_lr_scheduler(optimizer, LRScheduler(), total_steps=10**6)
    train_state = TrainState()
    states = {OPTIMIZER: OptimizerState(model, optimizer), LR_SCHEDULER: LRSchedulerState(lr_scheduler),
              TRAIN_STATE: train_state}
    job = Job(model, optimizer, lr_scheduler, train_state, states)
    job.tokens = batch(model_args, 1)
    job.step()
    return job


def batch(model_args: ModelArgs, size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(SEED)
    return torch.randint(model_args.vocab_size, (size, SEQ_LEN + 1), generator=generator)


def calibrate_step(job: Job, model_args: ModelArgs) -> float:
    """Double the batch until a step takes about ``STEP_TARGET_S``; returns the last step time (best of 3)."""
    size = 1
    while True:
        job.tokens = batch(model_args, size)
        for _ in range(2):  # warm-up at this shape
            job.step()
        seconds = min(job.step()[0] for _ in range(3))  # the best of 3: other load only slows steps down
        if seconds >= STEP_TARGET_S or size >= MAX_BATCH:
            return seconds
        size *= 2


# ---- baselines ------------------------------------------------------------------------------


def disk_pass(path: Path, nbytes: int, clock: Clock) -> tuple[float, float]:
    """Write ``nbytes`` of random data in 64 MiB blocks + fdatasync, then read it back cold; (write s, read s)."""
    block = memoryview(os.urandom(min(BLOCK, nbytes)))

    def write() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            left = nbytes
            while left:
                left -= os.write(fd, block[: min(left, len(block))])
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def read() -> None:
        buffer = bytearray(BLOCK)
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass

    try:
        return clock.time(write), clock.time(read)
    finally:
        path.unlink(missing_ok=True)


def torch_save_fsync(state: dict[str, Any], path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def baselines(job: Job, work_dir: Path, clock: Clock, repeats: int, nbytes: int) -> dict[str, Any]:
    """Disk write/read, torch.save + fsync, dcp.save and savepoint's sync save, taking turns."""
    state = job.state()
    manager = job.manager(work_dir, "sync", "disabled")
    times: dict[str, list[float]] = {"write": [], "read": [], "torch_save": [], "dcp_save": [], "hashing_save": [],
                                     "hashing_crc_save": [], "sync_save": []}
    sizes: dict[str, int] = {}

    def disk() -> None:
        write, read = disk_pass(work_dir / "disk.bin", nbytes, clock)
        times["write"].append(write)
        times["read"].append(read)

    def torch_save() -> None:
        path = work_dir / "state.pt"
        times["torch_save"].append(clock.time(lambda: torch_save_fsync(state, path)))
        sizes["torch_save"] = path.stat().st_size
        path.unlink()

    def dcp_save() -> None:
        path = work_dir / "dcp"
        times["dcp_save"].append(clock.time(lambda: dcp.save(state, checkpoint_id=path, no_dist=True)))
        sizes["dcp_save"] = folder_bytes(path)
        shutil.rmtree(path)

    def hashing_save() -> None:
        path = work_dir / "dcp-hashed"
        times["hashing_save"].append(clock.time(lambda: dcp.save(state, storage_writer=HashingWriter(path),
                                                                  no_dist=True)))
        sizes["hashing_save"] = folder_bytes(path)
        shutil.rmtree(path)

    def hashing_crc_save() -> None:
        path = work_dir / "dcp-hashed-crc"
        writer = HashingWriter(path, compute_crc32=True)
        times["hashing_crc_save"].append(clock.time(lambda: dcp.save(state, storage_writer=writer, no_dist=True)))
        sizes["hashing_crc_save"] = folder_bytes(path)
        shutil.rmtree(path)

    def sync_save() -> None:
        step = len(times["sync_save"]) + 1
        times["sync_save"].append(clock.time(lambda: manager.save(step)))
        sizes["sync_save"] = folder_bytes(manager.folder.step_dir(step))
        manager.folder.delete(step)

    ops = [disk, torch_save, dcp_save, hashing_save, hashing_crc_save, sync_save]
    try:
        for i in range(repeats):
            for op in ops[i % len(ops):] + ops[: i % len(ops)]:
                op()
    finally:
        manager.close()
    return {"times": times, "sizes": sizes}


def memcpy(nbytes: int, repeats: int) -> tuple[float, list[float]]:
    """``dst.copy_(src)`` of ``nbytes``: (the first copy into a fresh buffer, later copies into it)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    start = time.perf_counter()
    dst.copy_(src)  # page faults: the buffer is touched for the first time
    first = time.perf_counter() - start
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        seconds.append(time.perf_counter() - start)
    return first, seconds


# ---- async saves ----------------------------------------------------------------------------


@dataclass
class AsyncResult:
    call: list[float] = field(default_factory=list)  # idle loop: the save() call
    staging: list[float] = field(default_factory=list)  # idle loop: wait_for_staging() right after it
    durable: list[float] = field(default_factory=list)  # idle loop: save() call to finish_inflight() return
    rss: list[int] = field(default_factory=list)  # VmRSS after each idle-loop save completed
    rss_before: int = 0
    peak_rss: int = 0
    peak_is_hwm: bool = True
    writer_rss: int = 0  # the writer process's VmRSS, if there is one
    pss_before: int = 0  # the trainer's PSS before the first save
    pss_after: int = 0  # the trainer's PSS after the consecutive saves
    writer_pss: int = 0  # the writer process's PSS after them (0: no writer process)
    writer_pss_shmem: int = 0  # the part of it that is shared memory (the staging buffers)
    nbytes: int = 0
    loop_blocked: list[float] = field(default_factory=list)  # training loop: save() + staging wait before step
    loop_call: list[float] = field(default_factory=list)
    loop_durable: list[float] = field(default_factory=list)  # training loop: save() to commit by poll()
    steps_during: list[float] = field(default_factory=list)  # steps started while a save was in flight
    steps_normal: list[float] = field(default_factory=list)  # steps with no save in flight
    steps_per_save: list[int] = field(default_factory=list)


def async_saves(job: Job, work_dir: Path, clock: Clock, mode: str, saves: int, repeats: int) -> AsyncResult:
    """``saves`` consecutive saves with nothing in between, then ``repeats`` saves inside a training loop."""
    result = AsyncResult()
    manager = job.manager(work_dir, mode, mode)
    assert manager.saver is not None
    step = 0
    try:
        result.peak_is_hwm = reset_peak_rss()
        result.rss_before = proc_status()["VmRSS"]
        result.pss_before = proc_pss().get("Pss", 0)
        for _ in range(saves):
            step += 1
            clock.flush()
            start = time.perf_counter()
            manager.save(step)
            called = time.perf_counter()
            manager.wait_for_staging()
            staged = time.perf_counter()
            manager.finish_inflight()
            done = time.perf_counter()
            result.call.append(called - start)
            result.staging.append(staged - called)
            result.durable.append(done - start)
            status = proc_status()
            result.rss.append(status["VmRSS"])
            result.peak_rss = max(result.peak_rss, status.get("VmHWM", 0) if result.peak_is_hwm else 0,
                                  status["VmRSS"])
            result.nbytes = folder_bytes(manager.folder.step_dir(step))
            if step > 1:
                manager.folder.delete(step - 1)
        # The writer process (async_with_pinned_mem under a process group); not the resource tracker.
        writer_pids = [manager.saver.writer_pid] if manager.saver.writer_pid else []
        result.writer_rss = sum(proc_status(pid).get("VmRSS", 0) for pid in writer_pids)
        result.pss_after = proc_pss().get("Pss", 0)
        writers = [proc_pss(pid) for pid in writer_pids]
        result.writer_pss = sum(w.get("Pss", 0) for w in writers)
        result.writer_pss_shmem = sum(w.get("Pss_Shmem", 0) for w in writers)
        for _ in range(repeats):
            for _ in range(2):  # steps with no save in flight, interleaved with the saves against drift
                result.steps_normal.append(job.step()[0])
            step += 1
            clock.flush()
            start = time.perf_counter()
            manager.save(step)
            call = time.perf_counter() - start
            waits = []
            while manager.saver.inflight is not None and len(waits) < MAX_STEPS_PER_SAVE:
                seconds, waited = job.step(manager.wait_for_staging)
                result.steps_during.append(seconds)
                waits.append(waited)
                manager.poll()  # commits once the write is done, as the trainer does after every step
            manager.finish_inflight()  # a no-op unless the cap was hit
            result.loop_durable.append(time.perf_counter() - start)
            result.loop_call.append(call)
            result.loop_blocked.append(call + waits[0])
            result.steps_per_save.append(len(waits))
            manager.folder.delete(step - 1)
    finally:
        manager.close()
    return result


# ---- report ---------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values)


def row(name: str, seconds: list[float], nbytes: int | None = None, note: str = "") -> str:
    """One table line: median and range of ``seconds``, and the median's throughput over ``nbytes``."""
    spread = f"{min(seconds):.4f} - {max(seconds):.4f}"
    rate = f"{nbytes / 1e9 / median(seconds):>7.2f}" if nbytes else f"{'':>7}"
    return f"{name:<50} {median(seconds):>9.4f} {spread:>17} {rate} {len(seconds):>3}  {note}".rstrip()


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def report(args: argparse.Namespace, params: int, nbytes: int, step_s: float, batch_size: int,
           base: dict[str, Any], first_copy: float, copies: list[float], modes: dict[str, AsyncResult],
           cold: bool, wall: float) -> None:
    times, sizes = base["times"], base["sizes"]
    cache = "cold (page cache synced and dropped before every timed save and disk pass)" if cold else \
        "warm cache (dropping the page cache was not permitted; reads may be served from memory)"
    print()
    print(f"savepoint async save benchmark: torch {torch.__version__}, {os.cpu_count()} CPU cores, "
          f"{torch.get_num_threads()} torch threads, 1-rank gloo group, one process")
    print(f"model: Llama 3 dim {args.dim}, {args.n_layers} layers, {args.n_heads}/{args.n_kv_heads} heads, "
          f"vocab {args.vocab_size}: {params / 1e6:.1f}M parameters, fp32 + AdamW state = {nbytes / 1e9:.3f} GB "
          f"in memory ({sizes['sync_save'] / 1e9:.3f} GB as a savepoint step)")
    print(f"training step: forward + backward + AdamW on {batch_size} x {SEQ_LEN} tokens, {step_s:.3f} s when "
          f"calibrated (best of 3); background writer niceness +{staging.WRITER_NICE}")
    print(f"{args.repeats} repeats of each baseline (disk, torch.save, dcp.save, HashingWriter x2, sync save taking "
          f"turns in rotating order); {cache}")
    print()
    print(f"{'operation':<50} {'median s':>9} {'min - max s':>17} {'GB/s':>7} {'n':>3}")
    print(row("disk write 64 MiB blocks + fdatasync", times["write"], nbytes))
    print(row("disk read back (cold)" if cold else "disk read back (warm cache)", times["read"], nbytes))
    print(row("memcpy dst.copy_(src), preallocated dst", copies, nbytes, f"first copy into a fresh buffer "
                                                                         f"{first_copy:.4f} s"))
    print(row("torch.save + fsync", times["torch_save"], sizes["torch_save"]))
    print(row("dcp.save (default planner, no_dist)", times["dcp_save"], sizes["dcp_save"]))
    print(row("dcp.save through HashingWriter (no zip CRC-32)", times["hashing_save"], sizes["hashing_save"]))
    print(row("dcp.save through HashingWriter, CRC-32 kept", times["hashing_crc_save"], sizes["hashing_crc_save"]))
    print(row("savepoint sync save (durable, committed)", times["sync_save"], sizes["sync_save"]))
    for mode, r in modes.items():
        print(f"-- {mode}: {len(r.call)} saves with no training between them, then {len(r.loop_blocked)} inside "
              f"a training loop")
        print(row("  first save: save() call", r.call[:1]))
        print(row("  first save: wait_for_staging() right after", r.staging[:1]))
        print(row("  first save: durable (save() -> finish_inflight)", r.durable[:1], r.nbytes))
        if len(r.call) > 1:
            print(row("  later saves: save() call", r.call[1:]))
            print(row("  later saves: wait_for_staging() right after", r.staging[1:]))
            print(row("  later saves: durable (save() -> finish_inflight)", r.durable[1:], r.nbytes))
        print(row("  in loop: blocked (save() + wait before step)", r.loop_blocked, note="save() call alone "
                  f"median {median(r.loop_call):.4f} s"))
        print(row("  in loop: durable (save() -> commit by poll)", r.loop_durable, r.nbytes,
                  f"{min(r.steps_per_save)}-{max(r.steps_per_save)} steps per save"))
        print(row("  in loop: training step, no save in flight", r.steps_normal))
        print(row("  in loop: training step, save in flight", r.steps_during))
    print()
    print("memory over the consecutive saves (VmRSS after each save completed):")
    for mode, r in modes.items():
        drift = (r.rss[-1] - r.rss[0]) / r.rss[0] * 100
        peak = "VmHWM" if r.peak_is_hwm else "max sampled VmRSS"
        writer = f"; writer process VmRSS {r.writer_rss / 1e9:.3f} GB" if r.writer_rss else ""
        print(f"  {mode}: before {r.rss_before / 1e9:.3f} GB, after save 1 {r.rss[0] / 1e9:.3f} GB, after save "
              f"{len(r.rss)} {r.rss[-1] / 1e9:.3f} GB (drift {drift:+.2f} %), min-max {min(r.rss) / 1e9:.3f}-"
              f"{max(r.rss) / 1e9:.3f} GB, peak ({peak}) {r.peak_rss / 1e9:.3f} GB{writer}")
        if r.pss_before:
            writer = (f", writer process PSS {r.writer_pss / 1e9:.3f} GB (of it shared memory "
                      f"{r.writer_pss_shmem / 1e9:.3f} GB)") if r.writer_pss else ""
            print(f"  {mode}: PSS trainer before {r.pss_before / 1e9:.3f} GB, after the saves "
                  f"{r.pss_after / 1e9:.3f} GB{writer}")
    print()
    sync = median(times["sync_save"])
    write_bw = nbytes / median(times["write"])
    sync_bw = sizes["sync_save"] / sync
    missed: list[str] = []
    for mode, r in modes.items():
        blocked = median(r.loop_blocked)
        ratio = blocked / sync
        idle = (median(r.call[1:] or r.call) + median(r.staging[1:] or r.staging)) / sync
        print(f"{mode}: blocked / durable sync save: {ratio * 100:.2f} % (target <= {BLOCKED_TARGET * 100:.1f} %: "
              f"{verdict(ratio <= BLOCKED_TARGET)}); first save {(r.call[0] + r.staging[0]) / sync * 100:.1f} %; "
              f"with no training to overlap the staging copy {idle * 100:.2f} %")
        if ratio > BLOCKED_TARGET:
            missed.append(f"{mode} blocked")
        step_ratio = median(r.steps_during) / median(r.steps_normal)
        print(f"{mode}: training step during a save / normal: {step_ratio:.2f}x (target <= {STEP_TARGET:.2f}x: "
              f"{verdict(step_ratio <= STEP_TARGET)}); durable in {median(r.durable[1:] or r.durable) / sync:.2f}x "
              f"the sync save's time with no training, {median(r.loop_durable) / sync:.2f}x inside the loop")
        if step_ratio > STEP_TARGET:
            missed.append(f"{mode} step time")
    throughput = sync_bw / write_bw
    pairs = [(sizes["sync_save"] / s) / (nbytes / w) for s, w in zip(times["sync_save"], times["write"], strict=True)]
    print(f"sync save throughput / disk write bandwidth: {throughput * 100:.0f} % ({sync_bw / 1e9:.2f} / "
          f"{write_bw / 1e9:.2f} GB/s; target >= {THROUGHPUT_TARGET * 100:.0f} %: "
          f"{verdict(throughput >= THROUGHPUT_TARGET)}); per round {min(pairs) * 100:.0f} - {max(pairs) * 100:.0f} %")
    if throughput < THROUGHPUT_TARGET:
        missed.append("sync throughput")
    vs_torch = sync / median(times["torch_save"])
    vs_dcp = sync / median(times["dcp_save"])
    pairs = [s / t for s, t in zip(times["sync_save"], times["torch_save"], strict=True)]
    print(f"savepoint sync save / (torch.save + fsync): {vs_torch:.2f}x (target <= {VS_TORCH_TARGET:.1f}x: "
          f"{verdict(vs_torch <= VS_TORCH_TARGET)}); per round {min(pairs):.2f}x - {max(pairs):.2f}x; "
          f"/ raw dcp.save {vs_dcp:.2f}x")
    if vs_torch > VS_TORCH_TARGET:
        missed.append("sync vs torch.save")
    hashing = median(times["hashing_crc_save"]) / median(times["dcp_save"]) - 1
    pairs = [h / d - 1 for h, d in zip(times["hashing_crc_save"], times["dcp_save"], strict=True)]
    net = median(times["hashing_save"]) / median(times["dcp_save"]) - 1
    print(f"hashing cost (dcp.save through HashingWriter with CRC-32 kept / plain FileSystemWriter - 1): "
          f"{hashing * 100:+.1f} % (target <= {HASHING_TARGET * 100:.0f} %: "
          f"{verdict(hashing <= HASHING_TARGET)}); per round {min(pairs) * 100:+.1f} to {max(pairs) * 100:+.1f} %; "
          f"as savepoint writes (xxh3 instead of the CRC-32) {net * 100:+.1f} %")
    if hashing > HASHING_TARGET:
        missed.append("hashing cost")
    for mode, r in modes.items():
        if r.pss_before:
            added = r.pss_after + r.writer_pss - r.pss_before
            print(f"{mode}: memory added by the saves, PSS (trainer + writer process) {added / 1e9:.3f} GB = "
                  f"{added / nbytes:.2f}x the state (target <= {MEMORY_TARGET:.1f}x: "
                  f"{verdict(added <= MEMORY_TARGET * nbytes)})"
                  f"; VmRSS alone would say {(r.peak_rss - r.rss_before + r.writer_rss) / nbytes:.2f}x")
            if added > MEMORY_TARGET * nbytes:
                missed.append(f"{mode} memory")
    print(f"targets missed: {', '.join(missed) if missed else 'none'}")
    print(f"total wall time: {wall:.1f} s")
    print()
    pinned = modes.get("async_with_pinned_mem") or next(iter(modes.values()))
    name = "async_with_pinned_mem" if "async_with_pinned_mem" in modes else next(iter(modes))
    print(f"summary: saving {sizes['sync_save'] / 1e9:.2f} GB (Llama 3, {params / 1e6:.0f}M params + AdamW) "
          f"synchronously took {sync:.2f} s ({sync_bw / 1e9:.2f} GB/s, {throughput * 100:.0f} % of the disk's "
          f"{write_bw / 1e9:.2f} GB/s, {vs_torch:.2f}x torch.save + fsync); with {name} the training loop was "
          f"blocked {median(pinned.loop_blocked) * 1e3:.1f} ms per save "
          f"({median(pinned.loop_blocked) / sync * 100:.2f} % of the sync save), steps during a save took "
          f"{median(pinned.steps_during) / median(pinned.steps_normal):.2f}x a normal step, and RSS drifted "
          f"{(pinned.rss[-1] - pinned.rss[0]) / pinned.rss[0] * 100:+.2f} % over {len(pinned.rss)} saves "
          f"(medians, {'cold' if cold else 'warm'} cache, {os.cpu_count()} CPU cores, torch {torch.__version__})")


# ---- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model, few saves: a smoke run of ~30 s")
    parser.add_argument("--repeats", type=int, help="timed calls per baseline row and saves in the training "
                                                    "loop per async mode (default 3, --quick 2)")
    parser.add_argument("--saves", type=int, help="consecutive async saves per mode for the RSS drift "
                                                  "(default 50, --quick 8)")
    parser.add_argument("--dim", type=int, help="model width (default 1024, --quick 256)")
    parser.add_argument("--n-layers", type=int, help="transformer blocks (default 2, --quick 2)")
    parser.add_argument("--vocab-size", type=int, help="vocabulary size (default 32000, --quick 8192)")
    parser.add_argument("--n-heads", type=int, default=16, help="attention heads (default 16)")
    parser.add_argument("--n-kv-heads", type=int, default=8, help="key/value heads (default 8)")
    parser.add_argument("--dir", help="parent folder of the temporary checkpoint folder (default: the system's)")
    args = parser.parse_args(argv)
    for key, value in PRESETS["quick" if args.quick else "default"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.repeats < 1 or args.saves < 1:
        parser.error("--repeats and --saves must be at least 1")
    if args.dim % args.n_heads or (args.dim // args.n_heads) % 2:
        parser.error("--dim must be a multiple of --n-heads with an even head size (RoPE rotates pairs)")
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    logging.getLogger("savepoint").setLevel(logging.WARNING)  # the manager logs every save
    warnings.filterwarnings("ignore", message=".*pin.?memory.*")  # pinned memory needs CUDA; CPU uses shm
    # async_with_pinned_mem writes from a process, which needs a process group: one rank of gloo.
    if "RANK" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
    init_distributed(Comm(backend="gloo"))
    if dist.get_world_size() != 1:
        raise SystemExit("run this benchmark as one process, not under torchrun")
    model_args = ModelArgs(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                           vocab_size=args.vocab_size, max_seq_len=SEQ_LEN)
    work_dir = Path(tempfile.mkdtemp(prefix="savepoint-async-", dir=args.dir))
    print(f"benchmarking in {work_dir}", flush=True)
    clock = Clock()
    try:
        job = build_job(model_args)
        params = sum(p.numel() for p in job.model.parameters())
        nbytes = tensor_bytes(job.state())
        step_s = calibrate_step(job, model_args)
        print(f"  {params / 1e6:.1f}M parameters, {nbytes / 1e9:.3f} GB of state; step {step_s:.3f} s at batch "
              f"{job.tokens.shape[0]}; baselines ...", flush=True)
        base = baselines(job, work_dir, clock, args.repeats, nbytes)
        first_copy, copies = memcpy(nbytes, max(args.repeats, 5))
        modes = {}
        for mode in ASYNC_MODES:
            print(f"  {mode}: {args.saves} saves, then {args.repeats} in a training loop ...", flush=True)
            modes[mode] = async_saves(job, work_dir, clock, mode, args.saves, args.repeats)
        report(args, params, nbytes, step_s, job.tokens.shape[0], base, first_copy, copies, modes, clock.cold,
               time.perf_counter() - start)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
