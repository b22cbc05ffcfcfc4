"""The checkpoint manager: decides when to save and what to load, and wires the parts that do it.

It receives the ``[checkpoint]`` config section and the training components, and it owns the
checkpoint folder. Writing and committing a step is ``writing.py`` (see ``storage.py`` for the
commit protocol), async saves ``staging.py``, loading a step ``loading.py``, the Hugging Face
export and initial load ``hf_steps.py``. The trainer calls ``step_done`` after every step (and
``check_stop`` once before the first): the manager saves when a step is due, commits finished
async saves, and writes the preemption checkpoint when some rank got SIGTERM.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful

from savepoint.checkpoint.coordination import Coordinator
from savepoint.checkpoint.hf_steps import HFAdapter, HFSteps
from savepoint.checkpoint.loading import StepLoader
from savepoint.checkpoint.lock import FolderLock
from savepoint.checkpoint.memory import MemoryTier
from savepoint.checkpoint.shared import check_shared
from savepoint.checkpoint.staging import AsyncSaver
from savepoint.checkpoint.states import MODEL, ModelState
from savepoint.checkpoint.storage import checkpoint_location, location, open_folder
from savepoint.checkpoint.writing import StepWriter
from savepoint.config.job_config import Checkpoint as CheckpointConfig
from savepoint.dtypes import torch_dtype
from savepoint.durable import DCP_MARKER
from savepoint.errors import CheckpointError, CorruptCheckpointError

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _tile_nothing(key: str) -> bool:
    return False


class CheckpointManager:
    """Saves and loads ``{model tensors (flat), optimizer, lr_scheduler, dataloader, train_state}``.

    Args:
        cfg: the ``[checkpoint]`` section.
        dump_folder: ``--job.dump_folder``; ``cfg.folder`` is joined to it.
        model: the model whose parameters are saved flat at the top level.
        states: the other components by key (``optimizer``, ``lr_scheduler``, ...), each Stateful.
        job_config: the resolved config as a dict, stored in every step's manifest.
        layout: the resolved parallel degrees, stored in every step's manifest.
        column_tiled: which checkpoint keys the model's tensor-parallel plan shards by columns; they
            are saved as column tiles (see ``planner.py``). None tiles nothing.
        hf_adapter: maps the model to Hugging Face keys and config, for ``last_save_in_hf`` and
            ``initial_load_in_hf`` (needed only with those options).
        hf_assets_path: ``--model.hf_assets_path``: tokenizer files copied into an HF export, and
            the HF folder ``initial_load_in_hf`` reads when ``initial_load_path`` is unset.
    """

    def __init__(self, cfg: CheckpointConfig, dump_folder: str, model: torch.nn.Module,
                 states: dict[str, Stateful], job_config: dict[str, Any], layout: dict[str, int] | None = None,
                 column_tiled: Callable[[str], bool] | None = None, hf_adapter: HFAdapter | None = None,
                 hf_assets_path: str | None = None):
        self.hf = HFSteps(cfg, hf_adapter, hf_assets_path)  # first: missing tokenizer files fail fast
        self.cfg = cfg
        self.folder = open_folder(checkpoint_location(dump_folder, cfg.folder))
        self.model_state = ModelState(model)
        self.states = states
        self.job_config = job_config
        self.layout = layout or {"world_size": dist.get_world_size() if dist.is_initialized() else 1}
        self.column_tiled = column_tiled or _tile_nothing  # a module function: the planner may be pickled
        self.coord = Coordinator()
        self.saver = AsyncSaver(cfg.async_mode) if cfg.enable and cfg.async_mode != "disabled" else None
        self.writer = StepWriter(cfg, self.folder, self.coord, self.layout, job_config)
        self.loader = StepLoader(cfg, self.folder, self.coord, self.model_state, states,
                                 job_config.get("model", {}).get("flavor"))
        self.memory: MemoryTier | None = None  # the in-memory tier (see memory.py)
        if cfg.enable and not cfg.load_only:
            self.coord.run_on_rank0(self.writer.prepare, f"preparing {self.folder.root}")
            try:
                check_shared(self.coord, self.folder.root)  # before the first step, not at the first save
                if cfg.memory_interval > 0 and not cfg.create_seed_checkpoint:
                    self.memory = MemoryTier(cfg, self.coord, self.model_state, states, self.layout)
                    self.memory.prepare(self.folder.root)
            except BaseException:
                if self.lock is not None:  # no manager comes back to close it
                    self.lock.release()
                raise

    @property
    def lock(self) -> FolderLock | None:
        """Rank 0's one-writer-per-folder lock, held until ``close()`` (None elsewhere, or before it is taken)."""
        return self.writer.lock

    def close(self) -> None:
        """Wait for (and commit) a save in flight, then release the checkpointer's process groups and folder lock.

        The job ended cleanly (trained to the end, or preempted with a durable checkpoint): the
        in-memory steps are removed, since no restart will need them.
        """
        try:
            self.finish_inflight()
            if self.saver is not None:
                self.saver.close()
            if self.memory is not None:
                self.memory.close(remove=True)
            self.coord.close()
        finally:
            if self.lock is not None:
                self.lock.release()

    # ---- the trainer's calls -------------------------------------------------------------------

    def wait_for_staging(self) -> None:
        """Call right before ``optimizer.step()``: returns once an async save has copied the state."""
        if self.saver is not None:
            self.saver.wait_for_staging()
        if self.memory is not None:
            self.memory.wait_for_staging()

    def step_done(self, step: int, stop_requested: Callable[[int], bool], last_step: bool = False,
                  more: bool = True) -> bool:
        """After training ``step``: save it if due; then, if training goes on (``more``), ``check_stop``.

        A periodic save's failure is logged and training goes on (the commit protocol removed the
        failed step and kept the older ones; stopping would only lose the training since the last
        committed step). The final save (``last_step``) waits for the save in flight first (whose
        failure is not the final's: it is logged), and its own failure ends the run.

        Returns whether training stops now (some rank got SIGTERM; the preemption checkpoint is written).

        Raises:
            CheckpointError: the final save failed.
            FatalCheckpointError: no save can succeed (the ranks do not share a folder, the lock is lost).
        """
        memory_due = False
        if last_step:
            self._logged(self.finish_inflight)
            self.save(step, last_step=True)
        else:
            # A RAM save only when no durable save was started: the trainer copies its state once.
            saved = self._logged(lambda: self.save(step))
            memory_due = self.memory is not None and saved is not True and self.memory.due(step)
        if self.memory is not None:
            self.memory.poll()
        if more:
            return self.check_stop(step, stop_requested, memory_due)
        if memory_due:  # training stops here without a final save (``stop_after``): as at any other step
            self._memory_save(step, self._verdicts(False, step)[2])
        return False

    def check_stop(self, step: int, stop_requested: Callable[[int], bool], memory_due: bool = False) -> bool:
        """At ``step``, between steps: one collective carries three verdicts, whether the async save in
        flight is written on every rank (then it is committed; a failure is logged), whether every
        rank's in-memory save is written, and whether ``stop_requested(step)`` on some rank (it got
        SIGTERM). On SIGTERM, commit ``step`` (unless just committed) and return True, the same on
        every rank. Else, if ``memory_due``, start the in-memory save of ``step``, or skip it on every
        rank when some rank is still writing the one before (so that all ranks hold the same steps).

        Raises:
            CheckpointError: the preemption save failed.
        """
        commit, stop, memory_ready = self._verdicts(stop_requested(step), step if memory_due else None)
        if commit:
            self._logged(self.finish_inflight)
        if stop:
            self._save_for_preemption(step)
        elif memory_due:
            self._memory_save(step, memory_ready)
        return stop

    def _memory_save(self, step: int, every_rank_ready: bool) -> None:
        assert self.memory is not None
        if every_rank_ready:
            self.memory.save(step, self.writer.committed)
        else:
            self.memory.skip(step)

    def poll(self, stop_requested: bool = False) -> bool:
        """Commit a finished async save (every rank finished writing), or raise its error; never blocks.

        Returns whether some rank passed ``stop_requested``, the same on every rank (one collective).
        """
        commit, stop, _ = self._verdicts(stop_requested)
        if commit:
            self.finish_inflight()
        return stop

    def _verdicts(self, stop_requested: bool, memory_step: int | None = None) -> tuple[bool, bool, bool]:
        """(an async save is in flight and written on every rank, some rank passed ``stop_requested``, every
        rank is ready for the in-memory save of ``memory_step``: not writing one, room for it)."""
        inflight = self.saver is not None and self.saver.inflight is not None
        ready = memory_step is None or self.memory is None or self.memory.ready(memory_step)
        (done, all_ready), (stop,) = self.coord.verdicts([not inflight or self.saver.done(), ready],
                                                         [stop_requested])
        return inflight and done, stop, all_ready

    @staticmethod
    def _logged(save: Callable[[], T]) -> T | None:
        """Run a periodic save (or the commit of one); on failure log it and go on training."""
        try:
            return save()
        except CheckpointError as e:
            logger.error("%s; training continues and the next save retries", e)
            return None

    def _save_for_preemption(self, step: int) -> None:
        """Every rank agreed to stop after ``step``: commit it (unless just committed) and return."""
        if not self.cfg.enable or self.cfg.load_only:
            flag = "--checkpoint.load_only is set" if self.cfg.enable else "--checkpoint.enable is off"
            logger.warning("preempted at step %d: nothing was saved (%s); a restart begins from scratch",
                           step, flag)
            return
        try:
            self.finish_inflight()  # the save in flight is committed (if it was this step's, that is all)
        except CheckpointError as e:
            logger.error("%s; saving step %d again, synchronously", e, step)
        if self.writer.committed != step:
            if step == 0:
                logger.warning("preempted before the first step: nothing to save")
                return
            self.save_now(step)
        logger.info("preempted at step %d: checkpoint step-%d committed", step, step)

    # ---- saving ------------------------------------------------------------------------------

    def finish_inflight(self) -> None:
        """Wait until the async save in flight is written on every rank, then commit it (or raise)."""
        if self.saver is None or self.saver.inflight is None:
            return
        inflight = self.saver.inflight
        error = self.saver.wait()
        self.saver.inflight = None
        self.writer.finish(inflight.step, inflight.kind, inflight.staging_dir, error, inflight.started, "async ")

    def should_save(self, step: int, last_step: bool = False) -> bool:
        if not self.cfg.enable or self.cfg.load_only:
            return False
        if step == 1 and self.cfg.enable_first_step_checkpoint:
            return True
        return last_step or step % self.cfg.interval == 0

    def save(self, step: int, last_step: bool = False) -> bool:
        """Save ``step`` if the interval, first-step or last-step rule asks for it; returns whether it did.

        Periodic saves with an async mode return once the state is handed over (committed by
        ``finish_inflight``); the final save is synchronous, and model-only or an HF folder as configured.
        """
        if not self.should_save(step, last_step):
            return False
        self.finish_inflight()  # at most one save in flight; its error, if any, surfaces here
        model_only = last_step and self.cfg.last_save_model_only
        if model_only and self.cfg.last_save_in_hf:
            self.writer.write(step, "hf", self.hf.export(self.model_state.state_dict(), self.coord.group),
                              what="as a Hugging Face folder ")
        elif model_only:
            dtype = torch_dtype(self.cfg.export_dtype)
            self._write_dcp(step, "model_only", lambda: self._model_only_state(dtype))
        else:
            self._write_dcp(step, "full", self._full_state, background=not last_step)
        return True

    def save_now(self, step: int) -> None:
        """Save ``step`` in full and synchronously, whatever the interval (preemption), after the save in flight.

        Raises:
            CheckpointError: the save in flight or this one failed.
        """
        self.finish_inflight()
        self._write_dcp(step, "full", self._full_state)

    def save_seed(self) -> None:
        """Write the model's initial weights (float32) as the model-only ``step-0`` of an empty folder.

        Raises:
            CheckpointError: the folder already holds committed steps.
        """
        existing = self.coord.run_on_rank0(self.folder.committed_steps, f"listing {self.folder.root}")
        if existing:
            raise CheckpointError(
                f"--checkpoint.create_seed_checkpoint: {self.folder.root} already holds steps {existing}; "
                "a seed checkpoint starts a new run, so point --checkpoint.folder (or --job.dump_folder) "
                "at an empty folder"
            )
        self._write_dcp(0, "seed", lambda: self._model_only_state(torch.float32))

    def _write_dcp(self, step: int, kind: str, build_state: Callable[[], dict[str, Any]],
                   background: bool = False) -> None:
        saver = self.saver if background else None
        self.writer.write(step, kind, self.writer.dcp_step(step, kind, build_state, self.column_tiled, saver))

    def _full_state(self) -> dict[str, Any]:
        return {**self.model_state.state_dict(), **self.states}

    def _model_only_state(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Model tensors with floating ones cast to ``dtype`` (integer and bool tensors stay as they are)."""
        return {
            k: v.to(dtype) if torch.is_floating_point(v) and v.dtype != dtype else v
            for k, v in self.model_state.state_dict().items()
        }

    # ---- loading -----------------------------------------------------------------------------

    def load(self, step: int = -1) -> int | None:
        """Restore state at start-up (see ``_load``); then drop the in-memory steps past the step resumed at."""
        loaded = self._load(step)
        if self.memory is not None:
            self.memory.drop_newer_than(loaded)
        return loaded

    def _load(self, step: int = -1) -> int | None:
        """Restore state at start-up; returns the loaded step, or None for a fresh start.

        ``step == -1`` resumes from the latest committed step in the folder; when there is none,
        ``initial_load_path`` (if set) is loaded instead. An explicit step must exist.

        Raises:
            CheckpointError: an explicit step is missing, or the checkpoint does not fit.
        """
        if not self.cfg.enable:
            return None
        # Rank 0 looks at the folder and every rank follows it, so all ranks load the same step.
        committed = self.coord.run_on_rank0(self.folder.committed_steps, f"listing {self.folder.root}")
        if step != -1:
            self.writer.committed = self._load_explicit(step, committed)
            return step
        from_memory = self._load_from_memory(committed)
        if from_memory is not None:
            return from_memory
        if committed:
            if self.folder.is_hf(committed[-1]):
                raise self.loader.hf_step_error(committed[-1], committed)
            loaded = self.writer.committed = self.loader.resume_latest(committed)
            if loaded == committed[-1] and not self.cfg.load_only:
                # A job killed between its last commit and that save's retention left one step too
                # many; apply retention now, as that save would have (it never touches the loaded step).
                self.writer.retain(loaded)
            return loaded
        if self.cfg.initial_load_in_hf:
            self.hf.load_initial(self.model_state.model)
            return 0
        if self.cfg.initial_load_path:
            return self.loader.load_initial(location(self.cfg.initial_load_path))
        logger.info("no checkpoint in %s: fresh start", self.folder.root)
        return None

    def _load_from_memory(self, committed: list[int]) -> int | None:
        """Resume from the newest in-memory step every rank has, if it is at least as new as the newest
        durable step; returns it, or None (then the durable folder decides, as without the tier)."""
        if self.memory is None:
            return None
        durable_latest = committed[-1] if committed else None
        for step in self.memory.candidates(durable_latest, committed):
            if self.memory.load(step):
                # Durable saves go on as before: the preemption save writes this step durably if due.
                self.writer.committed = durable_latest
                if durable_latest is not None:
                    self.writer.retain(durable_latest)  # as a resume from it would
                return step
        return None

    def _load_explicit(self, step: int, committed: list[int]) -> int:
        """``--checkpoint.load_step``: that committed DCP step, or an error saying which steps there are."""
        if step not in committed:
            step_dir = self.folder.step_dir(step)
            why = (f"{step_dir} exists but is not committed (no {DCP_MARKER}: an incomplete or hand-made folder, "
                   "which savepoint never loads); " if isinstance(step_dir, Path) and step_dir.is_dir() else "")
            raise CheckpointError(
                f"--checkpoint.load_step={step}: no committed step-{step} in {self.folder.root}; {why}"
                f"committed steps: {committed or 'none'}; pick one of them with --checkpoint.load_step, or drop "
                "the flag to resume from the latest"
            )
        if self.folder.is_hf(step):
            raise self.loader.hf_step_error(step, committed)
        try:
            return self.loader.load_step(step, committed)
        except CorruptCheckpointError as e:
            raise CorruptCheckpointError(
                f"{e}. Check it with `savepoint verify {self.folder.step_dir(step)}`; choose another "
                f"--checkpoint.load_step (committed: {committed})") from None


__all__ = ["CheckpointManager", "MODEL"]
