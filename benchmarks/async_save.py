"""Benchmark: what an async save costs the training loop, against the disk, memcpy, torch.save and sync saves.

    .venv/bin/python benchmarks/async_save.py            # Llama 3 of ~89M parameters + AdamW (~1.07 GB), ~4 min
    .venv/bin/python benchmarks/async_save.py --quick    # a small smoke run (~30 s)

Run it from the repository root with the venv's interpreter (``bash scripts/bootstrap.sh`` makes
``.venv`` in a fresh clone; see ``benchmarks/_common.py``).

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
import os
import shutil
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common as common
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from async_report import Results, report
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful

from savepoint.checkpoint import CheckpointManager
from savepoint.checkpoint.hashing import HashingWriter
from savepoint.checkpoint.states import ModelState, TrainState
from savepoint.checkpoint.storage import folder_bytes
from savepoint.config.job_config import Comm, LRScheduler, Optimizer
from savepoint.distributed import init_distributed
from savepoint.models.llama3.args import ModelArgs
from savepoint.models.llama3.model import build_model
from savepoint.optim import build_lr_scheduler, build_optimizer

if __name__ == "__mp_main__":  # this file imported by the spawned writer process of async_with_pinned_mem
    import torch.distributed.checkpoint._async_process_executor as _executor

    _executor._init_logger = lambda rank: None  # it logs every request at INFO; warnings and errors still show

SEED = 0
SEQ_LEN = 64  # tokens per sequence of the training step; the batch size is calibrated
BLOCK = 64 << 20  # the disk pass writes and reads in 64 MiB blocks
CLEAR_REFS = Path("/proc/self/clear_refs")  # writing "5" resets VmHWM (peak RSS)
STEP_TARGET_S = 0.25  # the batch doubles until one training step takes at least this long
MAX_BATCH = 64
MAX_STEPS_PER_SAVE = 200  # safety cap on training steps run while one save is in flight
ASYNC_MODES = ("async", "async_with_pinned_mem")
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
        self.cold = common.flush_page_cache(self.cold)

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
    for thread in Path("/proc/self/task").iterdir():
        try:
            pids += [int(p) for p in (thread / "children").read_text().split()]
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
        return common.keep_all_manager(work_dir, folder, self.model, self.states, async_mode)

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
    states = common.checkpoint_states(model, optimizer, lr_scheduler, train_state)
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


# ---- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.model_parser(__doc__, PRESETS, "small model, few saves: a smoke run of ~30 s",
                                 "timed calls per baseline row and saves in the training loop per async mode "
                                 "(default 3, --quick 2)")
    parser.add_argument("--saves", type=int, help="consecutive async saves per mode for the RSS drift "
                                                  "(default 50, --quick 8)")
    args = parser.parse_args(argv)
    common.apply_preset(parser, args, PRESETS)
    if args.saves < 1:
        parser.error("--saves must be at least 1")
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    common.quiet_savepoint_log()
    warnings.filterwarnings("ignore", message=".*pin.?memory.*")  # pinned memory needs CUDA; CPU uses shm
    # async_with_pinned_mem writes from a process, which needs a process group: one rank of gloo.
    if "RANK" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
    init_distributed(Comm(backend="gloo"))
    if dist.get_world_size() != 1:
        raise SystemExit("run this benchmark as one process, not under torchrun")
    margs = common.llama_args(args, SEQ_LEN)
    clock = Clock()
    try:
        with common.work_folder("savepoint-async-", args.dir) as work_dir:
            run(args, margs, work_dir, clock, start)
    finally:
        dist.destroy_process_group()


def run(args: argparse.Namespace, model_args: ModelArgs, work_dir: Path, clock: Clock, start: float) -> None:
    """Build the job, time the baselines and both async modes, and print the report."""
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
    report(Results(args, params, nbytes, step_s, job.tokens.shape[0], SEQ_LEN, base, first_copy, copies, modes,
                   clock.cold, time.perf_counter() - start))


if __name__ == "__main__":
    main()
