"""Async saves: staging copies, their reused buffers, and the one save in flight.

``async``: the state is copied into CPU buffers (kept across saves) inside the save call, then a
background thread writes it. ``async_with_pinned_mem``: the copy itself runs in the background
into pinned (CUDA) or shared (CPU) buffers kept across saves, and a background *process* writes
it, so the writer never holds the trainer's GIL; the trainer only waits for the copy to finish
before the next ``optimizer.step()``, the first moment the parameters change.

Both write with ``dcp.async_save`` on a gloo group of their own, so background collectives never
meet the training group's or the checkpointer's. Committing (the rename that makes a step
visible) is not done here: the manager does it once every rank's write has finished.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.planner import SavePlanner
from torch.distributed.checkpoint.storage import StorageWriter
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType, AsyncSaveResponse

logger = logging.getLogger(__name__)


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
    """

    def __init__(self, mode: str):
        self.mode = mode
        cuda = torch.cuda.is_available()
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        pinned = mode == "async_with_pinned_mem"
        # Buffers are allocated by the first save and reused by every later one (DefaultStager
        # caches them). Pinned memory and non-blocking copies need CUDA; on CPU, shared memory
        # lets the writer process read the staged tensors without another copy.
        self.stager = DefaultStager(StagingOptions(
            use_pinned_memory=pinned and cuda,
            use_shared_memory=pinned and not cuda,
            use_async_staging=pinned,
            use_non_blocking_copy=pinned and cuda,
        ))
        # A background process needs a process group to join; an in-process run without torchrun
        # (tests, notebooks) writes from a thread instead.
        self.process = pinned and dist.is_initialized()
        self.inflight: InFlight | None = None

    def start(self, step: int, kind: str, staging_dir: Path, state: dict[str, Any], planner: SavePlanner,
              writer: StorageWriter) -> None:
        checkpointer = AsyncCheckpointerType.PROCESS if self.process else AsyncCheckpointerType.THREAD
        start = time.perf_counter()
        response = dcp.async_save(state, storage_writer=writer, planner=planner, process_group=self.group,
                                  async_checkpointer_type=checkpointer, async_stager=self.stager)
        if isinstance(response, AsyncSaveResponse):
            staged, written = response.staging_completion, response.upload_completion
        else:
            staged, written = None, response
        self.inflight = InFlight(step, kind, staging_dir, staged, written, start)
        logger.info("step %d: %s save started (%s writer); training blocked %.3f s", step, self.mode,
                    "process" if self.process else "thread", time.perf_counter() - start)

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

    def wait(self) -> BaseException | None:
        """Block until this rank's write is done; returns its error, if any (the save stays in flight)."""
        assert self.inflight is not None
        try:
            if self.inflight.staged is not None:
                self.inflight.staged.result()
            self.inflight.written.result()
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            return e
        return None

    def close(self) -> None:
        self.stager.close()
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None
