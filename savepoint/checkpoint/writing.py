"""Writing one step, whatever its kind: every rank writes into the staging folder, the ranks agree,
rank 0 commits (or removes the staging folder), and retention runs.

``StepWriter.write`` is the one path: rank 0 checks the folder lock and makes the staging folder;
every rank runs the kind's producer (DCP shards here, the Hugging Face folder in ``hf_steps.py``);
``finish`` agrees on the outcome. So either every rank returns with the step committed, or every
rank raises the same error and the staging folder is gone. An async save's producer returns while
the shards are still being written: ``finish`` runs when the saver reports them written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.stateful import Stateful

from savepoint.checkpoint.coordination import Coordinator, Failure, is_rank0, my_rank
from savepoint.checkpoint.lock import FolderLock
from savepoint.checkpoint.manifest import manifest_bytes
from savepoint.checkpoint.planner import TiledSavePlanner
from savepoint.checkpoint.rates import rate
from savepoint.checkpoint.staging import AsyncSaver
from savepoint.checkpoint.storage import CheckpointFolder, disk_full_hint
from savepoint.config.job_config import Checkpoint as CheckpointConfig
from savepoint.errors import CheckpointError, FatalCheckpointError

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "savepoint.step/1"

# A producer writes this rank's part of a step into the staging folder it is given. It returns
# whether the write goes on in the background (``finish`` then runs later); it raises on failure.
Produce = Callable[[Path], bool]


class StepWriter:
    """Writes, commits and retains the steps of one checkpoint folder (see ``storage.py`` for the protocol).

    Args:
        cfg: the ``[checkpoint]`` section (``keep_latest_k``, ``export_dtype``).
        folder: the checkpoint folder.
        coord: the agreement among the job's ranks.
        layout: the parallel degrees, stored in every manifest.
        job_config: the resolved config, stored in every manifest.
    """

    def __init__(self, cfg: CheckpointConfig, folder: CheckpointFolder, coord: Coordinator,
                 layout: dict[str, int], job_config: dict[str, Any]):
        self.cfg, self.folder, self.coord = cfg, folder, coord
        self.layout, self.job_config = layout, job_config
        self.lock: FolderLock | None = None  # rank 0's one-writer-per-folder lock, held until released
        self.committed: int | None = None  # the newest step committed by this job (or resumed from)

    def prepare(self) -> None:
        """Rank 0, once: create the folder, take its lock, then remove leftovers of interrupted saves."""
        self.folder.ensure_writable()
        self.lock = self.folder.lock()
        self.lock.acquire()  # before cleaning: another job's unfinished save is not a leftover
        self.folder.clean_leftovers()

    def write(self, step: int, kind: str, produce: Produce, what: str = "") -> None:
        """Begin ``step`` (rank 0), run ``produce`` on every rank, then ``finish`` unless it went on in the background.

        Raises:
            FatalCheckpointError / CheckpointError: see ``finish``; or the lock was lost (on every rank alike).
        """
        staging = self.folder.staging_dir(step)
        try:
            self.coord.run_on_rank0(lambda: self._begin(step), f"creating {staging}")
        except FatalCheckpointError:
            raise
        except CheckpointError as e:  # the same on every rank
            raise CheckpointError(f"saving step {step} {what}to {self.folder.step_dir(step)} failed ({e}); nothing "
                                  "was committed and earlier steps are intact") from e
        start = time.perf_counter()
        error: BaseException | None = None
        try:
            if produce(staging):
                return
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
            error = e
        self.finish(step, kind, staging, error, start, what=what)

    def _begin(self, step: int) -> Path:
        """Rank 0, as each save begins: check the folder lock is still this job's, then make the staging folder.

        Raises:
            FatalCheckpointError: the lock was lost (folder deleted, lock file replaced) and another
                job holds it now.
        """
        if self.lock is not None:
            self.lock.ensure_held()
        return self.folder.begin(step)

    def finish(self, step: int, kind: str, staging: Path, error: BaseException | None, start: float,
               how: str = "", what: str = "") -> None:
        """Agree on the write's outcome; rank 0 commits if every rank succeeded and its folder holds
        every rank's files, else removes the staging folder; then retention. Logs the step's size.

        Raises:
            FatalCheckpointError: the ranks do not save into one folder (on every rank alike).
            CheckpointError: some rank's write, or the commit, failed (on every rank alike).
        """
        failure, views = self.coord.agree(error, self.folder.writer_view(staging, my_rank()))  # alike on all ranks
        failure, total = self.coord.run_on_rank0(
            lambda: self._commit_or_abort(step, kind, staging, views, failure), "committing")
        if failure is not None:
            if failure.fatal and not is_rank0() and views[my_rank()].mark != views[0].mark:
                self.folder.abort(step)  # this rank's own copy, which rank 0 never saw
            raise failure.error(failure.message if failure.fatal else (
                f"{how}saving step {step} {what}to {self.folder.step_dir(step)} failed ({failure.message}); "
                f"nothing was committed and earlier steps are intact"
                f"{disk_full_hint(failure.errno, self.folder.root, self.cfg.keep_latest_k)}")) from error
        self.committed = step
        seconds = time.perf_counter() - start
        mine = sum(views[my_rank()].files.values())
        share = f"; this rank wrote {mine / 1e9:.3f} GB of it" if len(views) > 1 and kind != "hf" else ""
        label = f"Hugging Face safetensors, {self.cfg.export_dtype}" if kind == "hf" else f"{how}{kind}"
        logger.info("saved step %d (%s) to %s: %s%s", step, label, self.folder.step_dir(step),
                    rate(total, seconds), share)
        self.retain(step)  # after every rank has returned from the commit

    def _commit_or_abort(self, step: int, kind: str, staging: Path, views: list,
                         failure: Failure | None) -> tuple[Failure | None, int]:
        """Rank 0: unless some rank failed, check that the staging folder holds every rank's files and
        publish the step. Returns (None, the step's bytes), or (why not, 0): the staging folder is then gone."""
        if failure is None:
            try:
                self.folder.check_complete(step, staging, views)
                self.folder.commit(step, manifest_bytes(self._manifest(step, kind, staging)))
            except (Exception, CheckpointException) as e:
                failure = Failure.of(e, 0)
            else:  # committed: nothing from here on may remove it
                try:
                    return None, self.folder.step_bytes(step)
                except (OSError, CheckpointError):
                    return None, 0
        self.folder.abort(step)
        return failure, 0

    def _manifest(self, step: int, kind: str, staging: Path) -> dict[str, Any]:
        checksums, files = self.folder.seal(staging)
        return {
            "format": MANIFEST_FORMAT,
            "step": step,
            "kind": kind,
            "export_dtype": self.cfg.export_dtype if kind in ("model_only", "hf") else None,
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "layout": self.layout,
            "torch_version": torch.__version__,
            "created_unix": time.time(),
            "files": files,
            "checksums": checksums,
            "job_config": self.job_config,
        }

    def retain(self, step: int) -> None:
        """Apply keep_latest_k on rank 0 (every rank waits); a failure only warns: ``step`` stays committed."""
        self.coord.run_on_rank0(lambda: self._retain(step), "retention")

    def _retain(self, step: int) -> None:
        try:
            self.folder.retain_latest(self.cfg.keep_latest_k, just_saved=step)
        except OSError as e:
            logger.warning("retention after step %d failed (%s); older steps were kept and are retried "
                           "after the next save", step, e)

    def dcp_step(self, step: int, kind: str, build_state: Callable[[], dict[str, Any]],
                 tile_if: Callable[[str], bool], saver: AsyncSaver | None = None) -> Produce:
        """The producer of a DCP step: every rank writes its shards of ``build_state()`` (with ``saver``:
        in the background, committed by the manager's ``finish_inflight``).

        The ranks agree that every rank built its state before any enters DCP, whose collectives
        would otherwise meet a rank that failed earlier.
        """
        def produce(staging: Path) -> bool:
            error: BaseException | None = None
            state: dict[str, Any] = {}
            try:
                # Stateful components give their state now, inside this try, not inside dcp.save.
                state = {k: v.state_dict() if isinstance(v, Stateful) else v for k, v in build_state().items()}
            except (Exception, CheckpointException) as e:
                error = e
            if self.coord.first_failure(error) is not None:
                if error is not None:
                    raise error
                return False  # another rank failed: finish reports its error
            planner = TiledSavePlanner(tile_if=tile_if)
            if saver is not None:
                saver.start(step, kind, staging, state, planner, self.folder.dcp_writer(staging))
                return True
            dcp.save(state, storage_writer=self.folder.dcp_writer(staging), planner=planner,
                     process_group=self.coord.group)
            return False

        return produce
