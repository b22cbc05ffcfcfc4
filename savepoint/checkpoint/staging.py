"""Async saves: staging copies, their reused buffers, and the one save in flight.

``async``: the state is copied into CPU buffers (kept across saves) inside the save call, then a
background thread writes it. ``async_with_pinned_mem``: the copy itself runs in the background
into pinned (CUDA) or shared (CPU) buffers kept across saves, and a background *process* writes
it, so the writer never holds the trainer's GIL; the trainer only waits for the copy to finish
before the next ``optimizer.step()``, the first moment the parameters change.

Both write on a gloo group of their own, so background collectives never meet the training
group's or the checkpointer's. Committing (the rename that makes a step visible) is not done here:
the manager does it once every rank's write has finished.

What the save call costs the trainer is kept to handing the state dict to one long-lived thread
(``savepoint-ckpt``): ``dcp.async_save``'s own set-up (a logger wrapper per key, a new executor
thread per save, the hand-off to the staging thread, whose Python walk over the state holds the
GIL) runs there, overlapping the next forward. ``async`` still copies inside the call, and its
thread writes with ``dcp.save``. The writer (that thread's writes in ``async``, the writer process
in ``async_with_pinned_mem``) runs at a lower CPU priority (``WRITER_NICE``): on a machine with
few cores it otherwise takes cores from the training step, and only the copy, not the write,
must finish before ``optimizer.step()``.

The writer process dies with its trainer, however the trainer dies (``savepoint.lifeline``): left
running, it would go on writing into the folder, or wait in a collective for its peers for half
an hour.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.planner import SavePlanner
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType, AsyncSaveResponse
from torch.distributed.checkpoint.storage import StorageWriter

from savepoint import lifeline
from savepoint.errors import ConfigError

logger = logging.getLogger(__name__)

# Niceness added to the background writer (``SAVEPOINT_WRITER_NICE``, 0 disables): it yields the
# CPU to training on a busy machine, and still gets idle cores. The copy before optimizer.step() is
# not lowered.
WRITER_NICE_ENV = "SAVEPOINT_WRITER_NICE"
DEFAULT_WRITER_NICE = 10


def writer_nice() -> int:
    """``SAVEPOINT_WRITER_NICE`` (default 10), checked: a whole number from 0 to 19.

    Raises:
        ConfigError: any other value.
    """
    raw = os.environ.get(WRITER_NICE_ENV, "").strip()
    if not raw:
        return DEFAULT_WRITER_NICE
    if not (raw.isascii() and raw.isdigit()) or int(raw) > 19:
        raise ConfigError([f"{WRITER_NICE_ENV}={raw!r} in the environment: give the niceness added to the "
                           f"background checkpoint writer, a whole number from 0 (its trainer's priority) to 19 "
                           f"(the lowest), or unset it for {DEFAULT_WRITER_NICE}"])
    return int(raw)


def __getattr__(name: str) -> Any:
    if name == "WRITER_NICE":  # read when asked for, so that a bad value is reported where it is used
        return writer_nice()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _writer_niceness() -> int | None:
    """The niceness for writer threads: the trainer's own plus the writer's; None to leave them be."""
    nice = writer_nice()
    if nice <= 0 or not hasattr(os, "setpriority"):
        return None
    return min(19, os.getpriority(os.PRIO_PROCESS, 0) + nice)


def _set_niceness(tid: int, niceness: int | None) -> None:
    """Set one thread's niceness (0: the calling thread). On Linux niceness is per thread, and a new
    thread or process starts with the niceness of the thread that started it."""
    if niceness is None:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, tid, niceness)
    except OSError:  # not permitted, or the thread is gone: only a scheduling hint
        pass


def _set_process_niceness(pid: int, niceness: int | None) -> None:
    """Set the niceness of every thread of process ``pid``."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        _set_niceness(tid, niceness)


def _writer_process_pid() -> int | None:
    """The pid of DCP's checkpoint writer process (``AsyncCheckpointerType.PROCESS``), once it is started."""
    try:
        from torch.distributed.checkpoint import _async_process_executor as executor
        return executor._CHECKPOINT_PROCESS._save_process.pid  # type: ignore[union-attr]
    except (ImportError, AttributeError):
        return None


@dataclass
class InFlight:
    """A save whose files are still being written."""

    step: int
    kind: str
    staging_dir: Path
    staged: Future | None  # the staging copy (async_with_pinned_mem), None when the call staged
    written: Future  # the upload
    started: float


class AsyncSaver:
    """Starts DCP saves in the background, at most one at a time.

    Args:
        mode: ``async`` or ``async_with_pinned_mem``.
        local: each rank saves on its own, with no collective (the in-memory tier's per-rank steps):
            DCP runs without a process group and writes from a thread.
        cpu_group: with ``local``, a gloo group of the job, only to pass ``dcp.async_save``'s check
            that the job has a CPU backend (no collective runs on it).
    """

    def __init__(self, mode: str, local: bool = False, cpu_group: dist.ProcessGroup | None = None):
        self.mode = mode
        self.local = local
        self.writer_niceness = _writer_niceness()  # first: a bad SAVEPOINT_WRITER_NICE fails before any set-up
        cuda = torch.cuda.is_available()
        if local:
            self.group = cpu_group
        else:
            self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        pinned = mode == "async_with_pinned_mem"
        # A background process needs a process group to join; an in-process run without torchrun
        # (tests, notebooks) writes from a thread instead, as local saves always do.
        self.process = pinned and dist.is_initialized() and not local
        # Buffers are allocated by the first save and reused by every later one (DefaultStager
        # caches them). Pinned memory and non-blocking copies need CUDA; on CPU, shared memory
        # lets a writer process read the staged tensors without another copy (a writer thread
        # reads them in place: shared memory would only take room in /dev/shm).
        self.stager = DefaultStager(StagingOptions(
            use_pinned_memory=pinned and cuda,
            use_shared_memory=pinned and not cuda and (self.process or not local),
            use_async_staging=pinned,
            use_non_blocking_copy=pinned and cuda,
        ))
        self.inflight: InFlight | None = None
        # One long-lived thread starts every save (and, in ``async``, writes it), off the trainer's path.
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="savepoint-ckpt")
        self.writer_pid: int | None = None  # the writer process, once lowered in priority
        if self.process and not lifeline.writer_process_dies_with_trainer():
            logger.warning("this torch's DCP writer process cannot be tied to its trainer: if the trainer is "
                           "killed, its writer process may outlive it")

    def start(self, step: int, kind: str, staging_dir: Path, state: dict[str, Any], planner: SavePlanner,
              writer: StorageWriter) -> None:
        start = time.perf_counter()
        if self.mode == "async":
            # Copied now, inside the call (this mode's contract): parameters may change on return.
            staged_state = self.stager.stage(state)
            written = self.worker.submit(self._write, staged_state, planner, writer)
            self.inflight = InFlight(step, kind, staging_dir, None, written, start)
        else:
            staged: Future = Future()
            written = Future()
            self.worker.submit(self._start_pinned, state, planner, writer, staged, written)
            self.inflight = InFlight(step, kind, staging_dir, staged, written, start)
        logger.info("step %d: %s save started (%s writer); training blocked %.3f s", step,
                    "in-memory" if self.local else self.mode,
                    "process" if self.process else "thread", time.perf_counter() - start)

    def _write(self, staged_state: dict[str, Any], planner: SavePlanner, writer: StorageWriter) -> Any:
        """``async``, on the worker thread: write the staged copy, at the writer's priority."""
        _set_niceness(0, self.writer_niceness)  # this thread and those it starts (DCP's, the hashing thread)
        return dcp.save(staged_state, storage_writer=writer, planner=planner, process_group=self.group,
                        no_dist=self.local)

    def _start_pinned(self, state: dict[str, Any], planner: SavePlanner, writer: StorageWriter, staged: Future,
                      written: Future) -> None:
        """``async_with_pinned_mem``, on the worker thread: start the staging copy and the upload."""
        try:
            checkpointer = AsyncCheckpointerType.PROCESS if self.process else AsyncCheckpointerType.THREAD
            response = dcp.async_save(state, storage_writer=writer, planner=planner, process_group=self.group,
                                      async_checkpointer_type=checkpointer, async_stager=self.stager,
                                      no_dist=self.local)
            if isinstance(response, AsyncSaveResponse):
                inner_staged, inner_written = response.staging_completion, response.upload_completion
            else:
                inner_staged, inner_written = None, response
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            staged.set_exception(e)
            written.set_exception(e)
            return
        if inner_staged is None:
            staged.set_result(None)
        else:
            inner_staged.add_done_callback(lambda f: _chain(f, staged))
        inner_written.add_done_callback(lambda f: _chain(f, written))
        if self.process and self.writer_pid is None:
            self.writer_pid = _writer_process_pid()
            if self.writer_pid is not None:
                _set_process_niceness(self.writer_pid, self.writer_niceness)

    def wait_for_staging(self) -> None:
        """Block until the staging copy is done: after this, the parameters may change."""
        if self.inflight is not None and self.inflight.staged is not None:
            try:
                self.inflight.staged.result()
            except BaseException:  # reported with the upload's outcome by wait()
                pass
            self.inflight.staged = None

    def done(self) -> bool:
        return self.inflight is None or self.inflight.written.done()

    def wait(self, timeout: float | None = None) -> BaseException | None:
        """Block until this rank's write is done; returns its error, if any (the save stays in flight).

        Raises:
            TimeoutError: ``timeout`` seconds passed first (the save is still being written).
        """
        assert self.inflight is not None
        if timeout is not None:
            wait([f for f in (self.inflight.staged, self.inflight.written) if f is not None], timeout)
            if not self.inflight.written.done():
                raise TimeoutError(f"the save of step {self.inflight.step} is still being written")
        try:
            if self.inflight.staged is not None:
                self.inflight.staged.result()
            self.inflight.written.result()
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            return e
        return None

    def close(self) -> None:
        self.worker.shutdown(wait=True)
        self.stager.close()
        if self.group is not None and not self.local:
            dist.destroy_process_group(self.group)
            self.group = None


def _chain(source: Future, target: Future) -> None:
    """Copy ``source``'s outcome (result or error) into ``target``."""
    error = source.exception()
    if error is not None:
        target.set_exception(error)
    else:
        target.set_result(source.result())
