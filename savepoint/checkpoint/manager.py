"""The checkpoint manager: decides when to save and what to load, on top of torch DCP.

It receives the ``[checkpoint]`` config section and the training components, and it owns the
checkpoint folder (see ``storage.py`` for the commit protocol).
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
from torch.distributed.tensor import DTensor

from savepoint.checkpoint.compat import V03, detect_layout, from_v03_key, saved_model_keys, to_v03_key
from savepoint.checkpoint.completeness import check_complete, remove_mark, writer_view
from savepoint.checkpoint.coordination import Coordinator, Failure, is_rank0, my_rank
from savepoint.checkpoint.fit import check_component, check_model_fits, flavor_hint
from savepoint.checkpoint.hashing import HashingWriter, collect_checksums
from savepoint.checkpoint.lock import FolderLock
from savepoint.checkpoint.manifest import manifest_bytes
from savepoint.checkpoint.planner import TiledSavePlanner
from savepoint.checkpoint.reader import VerifyingReader
from savepoint.checkpoint.safe_load import SafeLoadPlanner
from savepoint.checkpoint.staging import AsyncSaver
from savepoint.checkpoint.states import MODEL, OPTIMIZER, TRAIN_STATE, ModelState, StagedLoad
from savepoint.checkpoint.storage import CheckpointFolder, disk_full_hint, folder_bytes
from savepoint.config.job_config import Checkpoint as CheckpointConfig
from savepoint.distributed import copy_full_into
from savepoint.errors import (
    CheckpointError,
    CorruptCheckpointError,
    NotSupportedYet,
)
from savepoint.hf.assets import check_export_assets
from savepoint.hf.folder import SafetensorsReader, StreamingHFWriter
from savepoint.hf.llama3 import Llama3HFAdapter, to_hf_key

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "savepoint.step/1"
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _tile_nothing(key: str) -> bool:
    return False


def _rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / 1e9:.3f} GB in {seconds:.3f} s ({nbytes / 1e9 / max(seconds, 1e-9):.2f} GB/s)"


def reject_unsupported(cfg: CheckpointConfig) -> None:
    """Options that parse but whose feature has not landed: fail loudly instead of ignoring them.

    Raises:
        NotSupportedYet: one of those options is set.
    """
    pending: dict[str, bool] = {}
    for flag, is_set in pending.items():
        if is_set:
            raise NotSupportedYet(
                f"{flag} is not supported yet by this version of savepoint; leave it at its default"
            )


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
                 column_tiled: Callable[[str], bool] | None = None, hf_adapter: Llama3HFAdapter | None = None,
                 hf_assets_path: str | None = None):
        reject_unsupported(cfg)
        self.hf_adapter = hf_adapter
        self.hf_assets_path = hf_assets_path
        # The final save's HF export copies tokenizer files: check them now, not after the whole run.
        exports_hf = cfg.enable and not cfg.load_only and cfg.last_save_in_hf and cfg.last_save_model_only
        self.hf_token_ids = check_export_assets(hf_assets_path, "--model.hf_assets_path") if exports_hf \
            else (None, None)
        self.cfg = cfg
        self.folder = CheckpointFolder(Path(dump_folder) / cfg.folder)
        self.model_state = ModelState(model)
        self.states = states
        self.job_config = job_config
        self.layout = layout or {"world_size": dist.get_world_size() if dist.is_initialized() else 1}
        self.column_tiled = column_tiled or _tile_nothing  # a module function: the planner may be pickled
        self.coord = Coordinator()
        self.saver = AsyncSaver(cfg.async_mode) if cfg.enable and cfg.async_mode != "disabled" else None
        self.lock: FolderLock | None = None  # rank 0's one-writer-per-folder lock, held until close()
        if cfg.enable and not cfg.load_only:
            self.coord.run_on_rank0(self._prepare_folder, f"preparing {self.folder.root}")

    def _prepare_folder(self) -> None:
        self.folder.ensure_writable()
        self.lock = FolderLock(self.folder.root)
        self.lock.acquire()  # before cleaning: another job's unfinished save is not a leftover
        self.folder.clean_leftovers()

    def close(self) -> None:
        """Wait for (and commit) a save in flight, then release the checkpointer's process groups and folder lock."""
        try:
            self.finish_inflight()
            if self.saver is not None:
                self.saver.close()
            self.coord.close()
        finally:
            if self.lock is not None:
                self.lock.release()

    # ---- async saves ---------------------------------------------------------------------------

    def wait_for_staging(self) -> None:
        """Call right before ``optimizer.step()``: returns once an async save has copied the state."""
        if self.saver is not None:
            self.saver.wait_for_staging()

    def poll(self, stop_requested: bool = False) -> bool:
        """Commit a finished async save (every rank finished writing), or raise its error; never blocks.

        Call once per step: a background failure surfaces at the next step. Returns whether some
        rank passed ``stop_requested`` (it got SIGTERM), the same on every rank: one collective
        carries both verdicts.
        """
        inflight = self.saver is not None and self.saver.inflight is not None
        done, stop = self.coord.all_and_any(not inflight or self.saver.done(), stop_requested)
        if inflight and done:
            self.finish_inflight()
        return stop

    def finish_inflight(self) -> None:
        """Wait until the async save in flight is written on every rank, then commit it (or raise)."""
        if self.saver is None or self.saver.inflight is None:
            return
        inflight = self.saver.inflight
        error = self.saver.wait()
        self.saver.inflight = None
        self._finish(inflight.step, inflight.kind, inflight.staging_dir, error, inflight.started, "async ")
        self.coord.run_on_rank0(lambda: self._retain(inflight.step), "retention")

    # ---- saving ------------------------------------------------------------------------------

    def should_save(self, step: int, last_step: bool = False) -> bool:
        if not self.cfg.enable or self.cfg.load_only:
            return False
        if step == 1 and self.cfg.enable_first_step_checkpoint:
            return True
        return last_step or step % self.cfg.interval == 0

    def save(self, step: int, last_step: bool = False) -> bool:
        """Save ``step`` if the interval, first-step or last-step rule asks for it; returns whether it did."""
        if not self.should_save(step, last_step):
            return False
        self.finish_inflight()  # at most one save in flight; its error, if any, surfaces here
        if self.saver is not None and not last_step:  # the final save is synchronous
            self._write(step, lambda: {**self.model_state.state_dict(), **self.states}, kind="full", background=True)
            return True
        model_only = last_step and self.cfg.last_save_model_only
        if model_only and self.cfg.last_save_in_hf:
            self._write_hf(step, EXPORT_DTYPES[self.cfg.export_dtype])
        elif model_only:
            dtype = EXPORT_DTYPES[self.cfg.export_dtype]
            self._write(step, lambda: self._model_only_state(dtype), kind="model_only")
        else:
            self._write(step, lambda: {**self.model_state.state_dict(), **self.states}, kind="full")
        # Retention runs on rank 0 only, after every rank has returned from the save above.
        self.coord.run_on_rank0(lambda: self._retain(step), "retention")
        return True

    def save_now(self, step: int) -> None:
        """Save ``step`` in full and synchronously, whatever the interval (preemption), after the save in flight.

        Raises:
            CheckpointError: the save in flight or this one failed.
        """
        self.finish_inflight()
        self._write(step, lambda: {**self.model_state.state_dict(), **self.states}, kind="full")
        self.coord.run_on_rank0(lambda: self._retain(step), "retention")

    def _retain(self, step: int) -> None:
        """Apply keep_latest_k; a failure only warns: the new step is committed whatever happens here."""
        try:
            self.folder.retain_latest(self.cfg.keep_latest_k, just_saved=step)
        except OSError as e:
            logger.warning("retention after step %d failed (%s); older steps were kept and are retried "
                           "after the next save", step, e)

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
        self._write(0, lambda: self._model_only_state(torch.float32), kind="seed")

    def _model_only_state(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Model tensors with floating ones cast to ``dtype`` (integer and bool tensors stay as they are)."""
        return {
            k: v.to(dtype) if torch.is_floating_point(v) and v.dtype != dtype else v
            for k, v in self.model_state.state_dict().items()
        }

    def _write(self, step: int, build_state: Callable[[], dict[str, Any]], kind: str,
               background: bool = False) -> None:
        """Every rank writes its shards into the staging folder; then, only if all succeeded, rank 0 commits.

        The ranks agree three times: that the staging folder exists, that every rank built its
        state (so that DCP's collectives line up: a rank that failed earlier would otherwise meet
        the others inside DCP), and that every rank wrote its shards. So either every rank returns
        with the step committed, or every rank raises and the staging folder is gone.
        """
        staging = self.folder.staging_dir(step)
        self.coord.run_on_rank0(lambda: self._begin(step), f"saving step {step}: creating {staging}")
        start = time.perf_counter()
        error: BaseException | None = None
        state: dict[str, Any] = {}
        try:
            # Stateful components give their state now, inside this try, not inside dcp.save.
            state = {k: v.state_dict() if isinstance(v, Stateful) else v for k, v in build_state().items()}
        except (Exception, CheckpointException) as e:
            error = e
        if self.coord.first_failure(error) is None:
            try:
                planner = TiledSavePlanner(tile_if=self.column_tiled)
                if background:
                    assert self.saver is not None
                    self.saver.start(step, kind, staging, state, planner, HashingWriter(staging))
                    return  # committed by finish_inflight once every rank has written
                dcp.save(state, storage_writer=HashingWriter(staging), planner=planner,
                         process_group=self.coord.group)
            except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
                error = e
        self._finish(step, kind, staging, error, start)

    def _begin(self, step: int) -> Path:
        """Rank 0, as each save begins: check the folder lock is still this job's, then make the staging folder.

        Raises:
            FatalCheckpointError: the lock was lost (folder deleted, lock file replaced) and another
                job holds it now.
        """
        if self.lock is not None:
            self.lock.ensure_held()
        return self.folder.begin(step)

    def _finish(self, step: int, kind: str, staging: Path, error: BaseException | None, start: float,
                how: str = "", what: str = "") -> None:
        """Agree on the write's outcome; commit on rank 0 if every rank succeeded and rank 0's folder
        holds every rank's files, else remove the staging folder. Logs the step's size on every rank.

        Raises:
            FatalCheckpointError: the ranks do not save into one folder (on every rank alike).
            CheckpointError: some rank's write, or the commit, failed (on every rank alike).
        """
        failure, views = self.coord.agree(error, writer_view(staging, my_rank()))  # the same on every rank
        total = 0
        if failure is None:
            failure, total = self.coord.run_on_rank0(lambda: self._commit(step, kind, staging, views), "committing")
        elif is_rank0():
            self.folder.abort(step)
        if failure is not None and failure.fatal:
            if not is_rank0() and views[my_rank()].mark != views[0].mark:
                self.folder.abort(step)  # this rank's own copy, which rank 0 never saw
            raise failure.error() from error
        if failure is not None:
            raise failure.error(
                f"{how}saving step {step} {what}to {self.folder.step_dir(step)} failed ({failure.message}); "
                f"nothing was committed and earlier steps are intact"
                f"{disk_full_hint(failure.errno, self.folder.root, self.cfg.keep_latest_k)}"
            ) from error
        seconds = time.perf_counter() - start
        mine = sum(views[my_rank()].files.values())
        share = f"; this rank wrote {mine / 1e9:.3f} GB of it" if len(views) > 1 and kind != "hf" else ""
        label = f"Hugging Face safetensors, {self.cfg.export_dtype}" if kind == "hf" else f"{how}{kind}"
        logger.info("saved step %d (%s) to %s: %s%s", step, label, self.folder.step_dir(step),
                    _rate(total, seconds), share)

    def _write_hf(self, step: int, dtype: torch.dtype) -> None:
        """The final save as a Hugging Face folder: ``step-N/model*.safetensors``, index, config, tokenizer.

        Tensor by tensor, every rank gathers the full tensor (a collective, so all ranks walk the
        same keys in the same order) and rank 0 converts and writes it; the shard in memory is the
        writer's pending shard. The commit protocol is the same as for DCP saves.
        """
        if self.hf_adapter is None:
            raise CheckpointError("--checkpoint.last_save_in_hf: this model has no Hugging Face adapter")
        staging = self.folder.staging_dir(step)
        self.coord.run_on_rank0(lambda: self._begin(step), f"saving step {step}: creating {staging}")
        start = time.perf_counter()
        model_sd = self.model_state.state_dict()
        out_dtype = {k: dtype if torch.is_floating_point(v) else v.dtype for k, v in model_sd.items()}
        plan = [(to_hf_key(k), tuple(v.shape), out_dtype[k]) for k, v in model_sd.items()]
        # Streams each tensor to its shard file as it comes: memory holds one tensor, not one shard.
        writer = StreamingHFWriter(staging, plan) if is_rank0() else None
        error: BaseException | None = None
        for key, value in model_sd.items():
            full = value.full_tensor() if isinstance(value, DTensor) else value
            if writer is not None and error is None:
                try:
                    writer.add(*self.hf_adapter.to_hf(key, full.detach().to("cpu", out_dtype[key])))
                except Exception as e:
                    error = e
        if writer is not None:
            try:
                if error is None:
                    writer.finish(self.hf_adapter.config(dtype, *self.hf_token_ids), self.hf_assets_path)
            except Exception as e:
                error = e
            finally:
                writer.close()
        self._finish(step, "hf", staging, error, start, what="as a Hugging Face folder ")

    def _commit(self, step: int, kind: str, staging: Path, views: list) -> tuple[Failure | None, int]:
        """Rank 0: check that the staging folder holds every rank's files, then publish the step.

        Returns (None, the step's bytes), or (why it could not, 0): the staging folder is then gone.
        """
        try:
            check_complete(step, staging, views)
            remove_mark(staging)  # before the manifest lists the files
            self.folder.commit(step, manifest_bytes(self._manifest(step, kind, staging)))
        except (Exception, CheckpointException) as e:
            self.folder.abort(step)
            return Failure.of(e, 0), 0
        return None, folder_bytes(self.folder.step_dir(step))

    def _manifest(self, step: int, kind: str, staging: Path) -> dict[str, Any]:
        checksums = collect_checksums(staging)  # first: it removes the writers' sidecars
        files = {p.name: p.stat().st_size for p in sorted(staging.iterdir()) if p.is_file()}
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

    # ---- loading -----------------------------------------------------------------------------

    def load(self, step: int = -1) -> int | None:
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
        if step != -1 and step not in committed:
            step_dir = self.folder.step_dir(step)
            why = (f"{step_dir} exists but is not committed (no .metadata: an incomplete or hand-made folder, "
                   "which savepoint never loads); " if step_dir.is_dir() else "")
            raise CheckpointError(
                f"--checkpoint.load_step={step}: no committed step-{step} in {self.folder.root}; {why}"
                f"committed steps: {committed or 'none'}; pick one of them with --checkpoint.load_step, or drop "
                "the flag to resume from the latest"
            )
        if step != -1:
            if self.folder.is_hf(step):
                raise self._hf_step_error(step, committed)
            try:
                return self._load_step(step, committed)
            except CorruptCheckpointError as e:
                raise CorruptCheckpointError(
                    f"{e}. Check it with `savepoint verify {self.folder.step_dir(step)}`; choose another "
                    f"--checkpoint.load_step (committed: {committed})") from None
        if committed:
            if self.folder.is_hf(committed[-1]):
                raise self._hf_step_error(committed[-1], committed)
            loaded = self._resume_latest(committed)
            if loaded == committed[-1] and not self.cfg.load_only:
                # A job killed between its last commit and that save's retention left one step too
                # many; apply retention now, as that save would have (it never touches the loaded step).
                self.coord.run_on_rank0(lambda: self._retain(loaded), "retention")
            return loaded
        if self.cfg.initial_load_in_hf:
            return self._load_hf_initial()
        if self.cfg.initial_load_path:
            path = Path(self.cfg.initial_load_path)
            if not (path / ".metadata").is_file():
                raise CheckpointError(
                    f"--checkpoint.initial_load_path={path} is not a DCP checkpoint folder (no .metadata); "
                    "point it at a step-N folder"
                )
            self._load_from(path, model_only=self.cfg.initial_load_model_only, source_step=None)
            return 0 if self.cfg.initial_load_model_only else self._loaded_step()
        logger.info("no checkpoint in %s: fresh start", self.folder.root)
        return None

    def _load_step(self, step: int, committed: list[int]) -> int:
        newer = [s for s in committed if s > step]
        if newer:
            logger.warning("loading step %d while newer steps %s exist from an earlier run; they are "
                           "replaced as training reaches them, until then auto-resume would pick them",
                           step, newer)
        if self.cfg.initial_load_path:
            logger.info("skipping --checkpoint.initial_load_path=%s: resuming from %s",
                        self.cfg.initial_load_path, self.folder.step_dir(step))
        # Step 0 is a seed checkpoint: weights only, training starts from scratch.
        self._load_from(self.folder.step_dir(step), model_only=(step == 0), source_step=step)
        if step == 0:
            logger.info("step-0 is a seed checkpoint: loaded its weights, training starts at step 1")
        return step

    def _resume_latest(self, committed: list[int]) -> int:
        """Load the newest committed step; if it is corrupt, warn loudly and take the one before, and so on.

        Raises:
            CorruptCheckpointError: the newest step is corrupt and ``fail_on_corruption`` is set, or
                every DCP step is corrupt.
        """
        candidates = [s for s in reversed(committed) if not self.folder.is_hf(s)]
        problems = []
        for step in candidates:
            try:
                return self._load_step(step, committed)
            except CorruptCheckpointError as e:
                problems.append(f"step-{step}: {e}")
                if self.cfg.fail_on_corruption:
                    raise CorruptCheckpointError(
                        f"auto-resume: {e}. --checkpoint.fail_on_corruption is set, so savepoint stops instead of "
                        f"falling back to an older step; inspect it with `savepoint verify {self.folder.root}`, "
                        f"then delete or move step-{step} aside, or pick a step with --checkpoint.load_step"
                    ) from None
                logger.error("CORRUPT CHECKPOINT: %s. Falling back to the previous committed step; training "
                             "repeats the steps after it. Run `savepoint verify %s` to see every damaged step "
                             "(--checkpoint.fail_on_corruption makes this an error instead)",
                             e, self.folder.root)
        raise CorruptCheckpointError(
            f"auto-resume: every committed step in {self.folder.root} is corrupt: " + "; ".join(problems)
            + "; move the folder aside to start fresh, or restore a good copy")

    def _hf_step_error(self, step: int, committed: list[int]) -> CheckpointError:
        dcp_steps = [s for s in committed if s != step and not self.folder.is_hf(s)]
        hint = (f"resume from the latest DCP step with --checkpoint.load_step {dcp_steps[-1]}, or "
                if dcp_steps else "")
        return CheckpointError(
            f"{self.folder.step_dir(step)} is a Hugging Face export (the final save with "
            f"--checkpoint.last_save_in_hf): it holds only weights, no optimizer or data position, so training "
            f"cannot resume from it; {hint}start a new run from its weights with --checkpoint.initial_load_path "
            f"{self.folder.step_dir(step)} --checkpoint.initial_load_in_hf and an empty --checkpoint.folder"
        )

    def _load_hf_initial(self) -> int:
        """Load weights from an HF folder (``initial_load_path``, else ``--model.hf_assets_path``) into any layout."""
        source = self.cfg.initial_load_path or self.hf_assets_path
        if source is None:
            raise CheckpointError("--checkpoint.initial_load_in_hf needs a folder: set --checkpoint.initial_load_path "
                                  "(or --model.hf_assets_path) to a Hugging Face model folder")
        if self.hf_adapter is None:
            raise CheckpointError("--checkpoint.initial_load_in_hf: this model has no Hugging Face adapter")
        start = time.perf_counter()
        folder = SafetensorsReader(source)  # plain reads: nothing stays resident after each tensor
        where = f"--checkpoint.initial_load_path={source}" if self.cfg.initial_load_path else \
            f"--model.hf_assets_path={source}"
        sources = self.hf_adapter.plan_load(folder, where)  # the same check as convert_from_hf
        model = self.model_state.model
        for ours, hf in sources.items():
            param = model.get_parameter(ours)
            tensor = self.hf_adapter.read_checked(folder, hf)  # NaN/inf refused, naming the tensor
            copy_full_into(param, self.hf_adapter.from_hf(ours, tensor).to(param.dtype))
        logger.info("loaded Hugging Face weights from %s (model only): %s", source,
                    _rate(folder.total_bytes(), time.perf_counter() - start))
        return 0

    def _loaded_step(self) -> int:
        train_state = self.states.get(TRAIN_STATE)
        return int(getattr(train_state, "step", 0))

    def _open(self, path: Path) -> tuple[VerifyingReader, Any]:
        """A verifying reader for ``path`` and its metadata, after every rank agreed they are sound.

        Raises:
            CorruptCheckpointError / UnsafeCheckpointError / CheckpointError: on every rank alike.
        """
        error: BaseException | None = None
        reader, saved = None, None
        try:
            # The manifest (bounded, self-checked, schema-checked) and integrity.step_checksums' rule for
            # steps without checksums; then .metadata: its checksum, a safe unpickle, every item within
            # a regular file of the step and every shape backed by stored bytes, before any byte is read.
            reader = VerifyingReader.for_step(path, require_checksums=self.cfg.require_checksums)
            saved = reader.read_metadata()
        except CheckpointError as e:
            error = e
        except OSError as e:
            error = CheckpointError(f"cannot read {path}: {e}")
        failure = self.coord.first_failure(error)
        if failure is not None:
            if isinstance(error, CheckpointError):
                raise error
            raise failure.error(f"loading {path} failed: {failure.message}")
        assert reader is not None
        if not reader.verified:
            logger.warning("%s has no checksums (written by TorchTitan: no step beside it has a manifest.json): "
                           "loading it unverified; --checkpoint.require_checksums makes this an error", path)
        return reader, saved

    def _load_from(self, path: Path, model_only: bool, source_step: int | None) -> None:
        reader, saved = self._open(path)
        saved_keys = saved.state_dict_metadata
        model_sd = self.model_state.state_dict()
        # TorchTitan 0.3 stores some tensors under new names; request each under the name it has.
        names = saved_model_keys(model_sd, saved_keys)
        v03 = detect_layout(saved_keys) == V03
        if v03:
            logger.info("%s is in TorchTitan 0.3 key layout (attention.qkv_linear.*, lm_head): loading by those names",
                        path)
        flavor = self.job_config.get("model", {}).get("flavor")
        check_model_fits(saved_keys, {k: t.shape for k, t in model_sd.items()}, str(path), names=names,
                         hint=lambda: flavor_hint(path, flavor))
        state: dict[str, Any] = {names[k]: t for k, t in model_sd.items()}
        staged = StagedLoad()  # every component's values are checked before any component changes
        if not model_only:
            for name, component in self.states.items():
                if name in self.cfg.exclude_from_loading:
                    continue
                check_component(saved_keys, name, path, self.folder, source_step)
                component = staged.wrap(name, component)
                if name == TRAIN_STATE:
                    component = _SavedRNGOnly(component, saved_keys)
                if name == OPTIMIZER and v03:
                    component = _RenamedKeys(component, to_v03_key, from_v03_key)
                state[name] = component
        start = time.perf_counter()
        try:
            dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(), process_group=self.coord.group)
        except (Exception, CheckpointException) as e:
            failure = Failure.of(e)
            raise failure.error(f"loading {path} failed: {failure.message}") from e
        staged.apply(path, saved)
        self.model_state.load_state_dict(model_sd)
        seconds = time.perf_counter() - start
        nbytes = _bytes_read(saved, state)
        skipped = [n for n in self.states if n in self.cfg.exclude_from_loading]
        logger.info("loaded %s (%s%s): %s", path, "model only" if model_only else "full",
                    f", excluded {','.join(skipped)}" if skipped and not model_only else "", _rate(nbytes, seconds))


class _RenamedKeys(Stateful):
    """A Stateful whose flat keys are stored under other names (the optimizer's FQNs in TorchTitan 0.3)."""

    def __init__(self, inner: Stateful, to_saved: Callable[[str], str], from_saved: Callable[[str], str]):
        self.inner, self.to_saved, self.from_saved = inner, to_saved, from_saved

    def state_dict(self) -> dict[str, Any]:
        return {self.to_saved(k): v for k, v in self.inner.state_dict().items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict({self.from_saved(k): v for k, v in state_dict.items()})


class _SavedRNGOnly(Stateful):
    """Requests only the RNG states the checkpoint has (none from TorchTitan, no CUDA from a CPU run)."""

    def __init__(self, inner: Stateful, saved_keys: Any):
        self.inner = inner
        prefix = f"{TRAIN_STATE}.rng_state."
        self.saved_rng = {k[len(prefix):].split(".", 1)[0] for k in saved_keys if k.startswith(prefix)}

    def state_dict(self) -> dict[str, Any]:
        state = dict(self.inner.state_dict())
        rng = {k: v for k, v in state.pop("rng_state", {}).items() if k in self.saved_rng}
        return {**state, "rng_state": rng} if rng else state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)


def _bytes_read(metadata: Any, state: dict[str, Any]) -> int:
    """Bytes of the checkpoint's data files that the requested top-level keys cover."""
    roots = set(state)
    return sum(
        info.length
        for index, info in metadata.storage_data.items()
        if index.fqn in roots or index.fqn.split(".", 1)[0] in roots
    )


__all__ = ["CheckpointManager", "MODEL", "reject_unsupported"]
