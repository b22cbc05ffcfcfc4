"""The in-memory tier: each rank's own checkpoint in node-local RAM, so a restarted process loses (almost) nothing.

With ``--checkpoint.memory_interval K`` every rank also saves its own shards every K steps into
``<memory_folder>/<run>/rank-<rank>/step-N`` (``/dev/shm``: RAM, which outlives a process but not
the node). Each such step is a DCP folder of that rank's local tensors (a sharded parameter's
local shard, not the whole tensor) with a manifest and checksums, written into a hidden
``.step-N.partial`` and published by rename, like a durable step: a torn copy is never used. The
save goes through the async machinery (a background copy, then a writer thread); it involves no
other rank, so it neither waits for nor blocks the others.

``<run>`` is an id kept in the durable checkpoint folder (``.savepoint.run``, see ``memory_run.py``):
a restart of the same job finds its RAM copies, and a new job in a fresh folder never loads another job's.

At start-up every rank lists its usable RAM steps; the ranks take the newest step every rank has,
if it is at least as new as the newest durable step, and load it. A rank whose copy is missing,
damaged or of another layout makes every rank move on to the next common step, then to the durable
folder. A RAM load reads into CPU buffers and checks every value before any component changes, so
a failed one leaves the model and the other components as they were.

RAM steps are never durable steps: retention, ``load_step``, discovery and ``verify`` of the
checkpoint folder do not see them. A save is skipped, with a warning, rather than fill the folder
(see ``RESERVE``); a failed one only warns. At a step due for a durable save, only the durable save
is made (the trainer copies its state once). The tier is removed when the job ends cleanly.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultSavePlanner
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

from savepoint.checkpoint.completeness import remove_mark
from savepoint.checkpoint.coordination import Coordinator, my_rank
from savepoint.checkpoint.hashing import HashingWriter, collect_checksums
from savepoint.checkpoint.manifest import manifest_bytes, read_manifest
from savepoint.checkpoint.memory_run import RUN_FILE, run_id
from savepoint.checkpoint.rates import rate
from savepoint.checkpoint.reader import VerifyingReader
from savepoint.checkpoint.safe_load import SafeLoadPlanner
from savepoint.checkpoint.staging import AsyncSaver
from savepoint.checkpoint.states import OPTIMIZER, ModelState, OptimizerState
from savepoint.checkpoint.storage import CheckpointFolder, folder_bytes
from savepoint.config.job_config import Checkpoint as CheckpointConfig
from savepoint.errors import CheckpointError, CorruptCheckpointError
from savepoint.values import LoadedValueError, show_value

logger = logging.getLogger(__name__)

MEMORY_FORMAT = "savepoint.memory-step/1"
MEMORY_KIND = "memory"
# A RAM save leaves at least this share of the folder's filesystem free (at most RESERVE_CAP bytes):
# other users of /dev/shm (NCCL, data-loader workers, shared tensors) fail when it is full.
RESERVE = 0.10
RESERVE_CAP = 1 << 30
SLACK = 4 << 20  # a step's files beyond its tensor bytes: pickled values, .metadata, the manifest

# Each rank saves and loads its RAM steps alone; DCP warns about that every time.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def _local(value: Any) -> Any:
    return value.to_local() if isinstance(value, DTensor) else value


def _to_local(tree: dict[str, Any]) -> dict[str, Any]:
    """The tree with each DTensor replaced by this rank's local tensor (a view, no copy)."""
    return {k: _to_local(v) if isinstance(v, dict) else _local(v) for k, v in tree.items()}


def _cpu_buffers(tree: dict[str, Any]) -> dict[str, Any]:
    """The tree with each tensor replaced by an empty CPU tensor of its local shape and dtype."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out[k] = _cpu_buffers(v)
        elif isinstance(v, torch.Tensor):
            local = _local(v)
            out[k] = torch.empty(local.shape, dtype=local.dtype, device="cpu")
        else:
            out[k] = v
    return out


def _copy_back(live: dict[str, Any], loaded: dict[str, Any]) -> dict[str, Any]:
    """Copy the loaded tensors into the live ones (in place) and return the live tree with the loaded values."""
    out: dict[str, Any] = {}
    for k, v in live.items():
        if isinstance(v, dict):
            out[k] = _copy_back(v, loaded[k])
        elif isinstance(v, torch.Tensor):
            _local(v).copy_(loaded[k])
            out[k] = v
        else:
            out[k] = loaded[k]
    return out


def _tensor_bytes(tree: dict[str, Any]) -> int:
    return sum(_tensor_bytes(v) if isinstance(v, dict) else v.numel() * v.element_size()
               for v in tree.values() if isinstance(v, (dict, torch.Tensor)))


class MemoryTier:
    """One rank's in-memory checkpoints (see the module doc).

    Args:
        cfg: the ``[checkpoint]`` section (``memory_interval``, ``memory_folder``, ``memory_keep_latest_k``).
        coord: the agreement among the job's ranks (start-up only: saves involve no other rank).
        model_state: the model, saved flat at the top level.
        states: the other components by key, each Stateful.
        layout: the parallel degrees: a RAM step is used only by the same rank of the same layout.
    """

    def __init__(self, cfg: CheckpointConfig, coord: Coordinator, model_state: ModelState,
                 states: dict[str, Stateful], layout: dict[str, int]):
        self.cfg, self.coord, self.model_state, self.states = cfg, coord, model_state, states
        self.layout = layout
        self.rank = my_rank()
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.saver = AsyncSaver("async_with_pinned_mem", local=True, cpu_group=coord.group)
        self.folder: CheckpointFolder | None = None
        self.run = ""
        self.short_of_space = False  # the last due save was skipped for want of space (warn once per episode)
        self.skipped = 0  # due saves skipped while the save in flight is written
        self.warned_slow = False
        self.step_bytes: int | None = None
        self.durable_step: int | None = None  # the newest durable step when the save in flight began
        # The ranks of this node, which share its memory folder (torchrun sets LOCAL_WORLD_SIZE).
        self.local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
        if self.world_size > 1 and cfg.memory_keep_latest_k == 1:
            logger.warning("--checkpoint.memory_keep_latest_k=1 at %d ranks: a crash while the ranks write a RAM "
                           "step can leave no step that every rank holds (the others have replaced theirs), and "
                           "the restart then loads from disk; 2 (the default) keeps the one before", self.world_size)

    # ---- start-up ------------------------------------------------------------------------------

    def prepare(self, durable_root: Path) -> None:
        """Every rank: find the run id (rank 0 keeps it), make this rank's folder, remove torn leftovers.

        Raises:
            CheckpointError: on every rank alike, when some rank cannot use ``memory_folder``.
        """
        memory_folder = Path(self.cfg.memory_folder).absolute()
        self.run = self.coord.run_on_rank0(lambda: run_id(durable_root, memory_folder),
                                           f"reading {durable_root / RUN_FILE}")
        root = memory_folder / self.run / f"rank-{self.rank}"
        error: BaseException | None = None
        try:
            root.mkdir(parents=True, exist_ok=True)
            if not os.access(root, os.W_OK | os.X_OK):
                raise PermissionError(f"{root} is not writable")
            self.folder = CheckpointFolder(root)
            self.folder.clean_leftovers()
        except OSError as e:
            error = e
        failure = self.coord.first_failure(error)
        if failure is not None:
            raise CheckpointError(
                f"--checkpoint.memory_folder={self.cfg.memory_folder}: {failure.message}; point it at a RAM-backed "
                "folder (tmpfs, such as /dev/shm) that every rank can write, or set --checkpoint.memory_interval 0 "
                "to turn the in-memory tier off")

    def usable_steps(self, committed: list[int]) -> list[int]:
        """This rank's committed RAM steps whose manifest is sound and names this step, run, rank and layout, and
        whose durable step (the newest durable step when it was saved) is still committed (``committed``).

        Other steps are removed: another layout (a restart with other settings), a renamed folder, or a
        durable history that is gone (its steps were deleted to start over or to roll back).
        """
        assert self.folder is not None
        usable = []
        for step in self.folder.committed_steps():
            try:
                manifest = read_manifest(self.folder.step_dir(step))
            except CorruptCheckpointError as e:
                logger.warning("in-memory step %d of rank %d is damaged (%s): not used", step, self.rank, e)
                continue
            identity = None if manifest is None else (manifest.get("format"), manifest.get("step"),
                                                      manifest.get("run"), manifest.get("rank"),
                                                      manifest.get("layout"))
            durable = None if manifest is None else manifest.get("durable_step")
            if identity == (MEMORY_FORMAT, step, self.run, self.rank, self.layout) and \
                    (durable is None or durable in committed):
                usable.append(step)
                continue
            why = ("no manifest" if manifest is None else f"durable step-{durable}, which is gone"
                   if identity == (MEMORY_FORMAT, step, self.run, self.rank, self.layout) else
                   f"written by another layout, run or step: step {manifest.get('step')}, "
                   f"layout {manifest.get('layout')}")
            logger.info("removing in-memory step %d of rank %d (%s)", step, self.rank, why)
            self._delete(step)
        return usable

    def _delete(self, step: int) -> None:
        assert self.folder is not None
        try:
            self.folder.delete(step)
        except OSError as e:
            logger.warning("could not remove %s (%s)", self.folder.step_dir(step), e)

    def drop_newer_than(self, step: int | None) -> None:
        """After the job resumed at ``step`` (None: a fresh start), this rank's RAM steps past it belong to a
        trajectory that is not being continued: they are removed, so that no later restart mixes them in."""
        if self.folder is None:
            return
        for newer in self.folder.committed_steps():
            if step is None or newer > step:
                logger.info("removing in-memory step %d of rank %d: the job resumed at %s", newer, self.rank,
                            f"step {step}" if step is not None else "a fresh start")
                self._delete(newer)

    def candidates(self, durable_latest: int | None, committed: list[int]) -> list[int]:
        """The RAM steps every rank has, at least as new as ``durable_latest``, newest first (alike on every rank)."""
        _, everyone = self.coord.agree(None, self.usable_steps(committed))
        common = set(everyone[0]).intersection(*everyone[1:])
        newer = sorted((s for s in common if durable_latest is None or s >= durable_latest), reverse=True)
        if not newer and any(everyone):
            newest = max(max(steps, default=-1) for steps in everyone)
            missing = [r for r, steps in enumerate(everyone) if newest not in steps]
            if missing:
                logger.warning("not resuming from memory: the newest in-memory step is %d and rank(s) %s do not have "
                               "it (their node lost its RAM, or they died before writing it)", newest,
                               ", ".join(map(str, missing)))
            else:
                logger.info("not resuming from memory: the newest in-memory step is %d and it is older than "
                            "durable step-%s", newest, durable_latest)
        return newer

    def load(self, step: int) -> bool:
        """Every rank loads its RAM copy of ``step``; True if every rank did. Else no rank changed anything."""
        assert self.folder is not None
        start = time.perf_counter()
        error: BaseException | None = None
        apply: Callable[[], None] | None = None
        optimizer = self.states.get(OPTIMIZER)
        fresh = isinstance(optimizer, OptimizerState) and not optimizer.optimizer.state
        try:
            apply = self._read(self.folder.step_dir(step))
        except (Exception, CheckpointException) as e:  # any failure only means: use another step
            error = e
        failure = self.coord.first_failure(error)
        if failure is not None:
            if fresh:
                # Asking a fresh optimizer for its state dict initialised it (torch takes a zero-lr
                # step); a fresh start must begin from a fresh optimizer, as without the tier.
                optimizer.optimizer.state.clear()
            logger.error("the in-memory checkpoint of step %d cannot be used (%s); falling back", step,
                         failure.message)
            return False
        assert apply is not None
        apply()
        logger.info("resuming from the in-memory checkpoint of step %d (%s): %s", step, self.folder.step_dir(step),
                    rate(folder_bytes(self.folder.step_dir(step)), time.perf_counter() - start))
        return True

    def _read(self, path: Path) -> Callable[[], None]:
        """Read and check this rank's copy into CPU buffers; returns what puts the values into the components."""
        reader = VerifyingReader.for_step(path, require_checksums=True)
        reader.read_metadata()
        model_sd = self.model_state.state_dict()
        live = {n: c.state_dict() for n, c in self.states.items() if n not in self.cfg.exclude_from_loading}
        buffers = {**_cpu_buffers(model_sd), **{n: _cpu_buffers(sd) for n, sd in live.items()}}
        dcp.load(buffers, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=True)
        for name in live:
            check = getattr(self.states[name], "check_state_dict", None)
            try:
                if check is not None:
                    check(buffers[name])
            except LoadedValueError as e:
                raise CorruptCheckpointError(f"{path}: {name}.{e.key} is {show_value(e.value)}, but it must be "
                                             f"{e.requirement}") from None

        def apply() -> None:
            with torch.no_grad():
                for key, tensor in model_sd.items():
                    _local(tensor).copy_(buffers[key])
                values = {n: _copy_back(sd, buffers[n]) for n, sd in live.items()}
            self.model_state.load_state_dict(model_sd)
            for name, state_dict in values.items():
                self.states[name].load_state_dict(state_dict)
        return apply

    # ---- saving --------------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        return self.cfg.memory_interval > 0 and step % self.cfg.memory_interval == 0

    def idle(self) -> bool:
        """No RAM save is being written (one may be written and not yet committed)."""
        return self.saver.inflight is None or self.saver.done()

    def ready(self, step: int) -> bool:
        """This rank's vote on saving ``step``: no save is being written and there is room (every rank's vote
        decides, so that all ranks hold the same steps). Never raises."""
        try:
            return self.idle() and self._room_for(step, self._step_bytes())
        except (Exception, CheckpointException) as e:
            logger.warning("in-memory save of step %d on rank %d: cannot check the room for it (%s); skipped",
                           step, self.rank, e)
            return False

    def _step_bytes(self) -> int:
        """What one RAM step of this rank takes (measured once: the state's sizes do not change)."""
        if self.step_bytes is None:
            state = {**_to_local(self.model_state.state_dict()),
                     **{n: _to_local(c.state_dict()) for n, c in self.states.items()}}
            self.step_bytes = _tensor_bytes(state) + SLACK
        return self.step_bytes

    def skip(self, step: int) -> None:
        """Some rank is still writing the previous RAM save, or has no room: every rank skips ``step``."""
        self.skipped += 1
        if not self.warned_slow and not self.short_of_space:
            self.warned_slow = True
            logger.warning("in-memory save of step %d skipped: some rank is still writing the one before (a RAM "
                           "save takes longer than --checkpoint.memory_interval=%d step(s) here) or has no room; "
                           "due saves are skipped until every rank is ready, and each saved step's log line "
                           "counts them", step, self.cfg.memory_interval)

    def save(self, step: int, durable_step: int | None) -> None:
        """Start this rank's RAM save of ``step`` (after committing the one before); never raises.

        ``durable_step``: the newest durable step now; a restart uses this RAM step only while that one
        is still committed.
        """
        assert self.folder is not None
        self.finish()
        staging: Path | None = None
        try:
            state = {**_to_local(self.model_state.state_dict()),
                     **{n: _to_local(c.state_dict()) for n, c in self.states.items()}}
            staging = self.folder.begin(step)
            self.durable_step = durable_step
            self.saver.start(step, MEMORY_KIND, staging, state, DefaultSavePlanner(), HashingWriter(staging))
        except (Exception, CheckpointException) as e:
            logger.warning("in-memory save of step %d on rank %d could not start (%s); training continues",
                           step, self.rank, e)
            self.saver.inflight = None
            if staging is not None:
                self.folder.abort(step)

    def _room_for(self, step: int, need: int) -> bool:
        """Whether ``need`` bytes from each rank of this node fit and leave the reserve free, after dropping this
        rank's older RAM steps if that makes room (a newer step is worth more than an older one)."""
        assert self.folder is not None
        need *= self.local_ranks  # every rank of the node writes one at the same time, into the same tmpfs
        usage = shutil.disk_usage(self.folder.root)
        reserve = min(int(usage.total * RESERVE), RESERVE_CAP)
        older = self.folder.committed_steps()
        mine = folder_bytes(self.folder.root) * self.local_ranks
        if usage.free - need < reserve and usage.free + mine - need >= reserve:
            while usage.free - need < reserve and older:
                dropped = older.pop(0)
                self.folder.delete(dropped)
                logger.info("dropped in-memory step %d of rank %d to make room for step %d", dropped, self.rank, step)
                usage = shutil.disk_usage(self.folder.root)
        if usage.free - need >= reserve:
            if self.short_of_space:
                logger.warning("in-memory saves resume at step %d: %s has room again", step, self.folder.root)
            self.short_of_space = False
            return True
        if not self.short_of_space:
            logger.warning("skipping the in-memory save of step %d on rank %d: the %d rank(s) of this node need "
                           "%.3f GB and %s has %.3f GB free, of which %.3f GB stay free for other users; in-memory "
                           "saves are skipped until there is room (durable saves go on); free memory there or "
                           "point --checkpoint.memory_folder at a bigger tmpfs", step, self.rank, self.local_ranks,
                           need / 1e9, self.folder.root, usage.free / 1e9, reserve / 1e9)
        self.short_of_space = True
        return False

    def poll(self) -> None:
        """Commit a finished RAM save; never blocks."""
        if self.saver.inflight is not None and self.saver.done():
            self.finish()

    def wait_for_staging(self) -> None:
        self.saver.wait_for_staging()

    def finish(self, timeout: float | None = None) -> None:
        """Wait for the RAM save in flight and commit it (this rank alone), then retention; failures only warn.

        With ``timeout``, give up after that many seconds, leaving the save uncommitted (a process
        that ends on an error commits what its writer finished, and does not wait long for more).
        """
        inflight = self.saver.inflight
        if inflight is None:
            return
        assert self.folder is not None
        try:
            error = self.saver.wait(timeout)
        except TimeoutError:
            logger.warning("in-memory save of step %d on rank %d not finished within %g s: left uncommitted",
                           inflight.step, self.rank, timeout)
            return
        self.saver.inflight = None
        step, staging = inflight.step, inflight.staging_dir
        try:
            if error is not None:
                raise error
            remove_mark(staging)
            self.folder.commit(step, manifest_bytes(self._manifest(step, staging)))
            older = [s for s in self.folder.committed_steps() if s < step]
            for old in older[:max(len(older) - (self.cfg.memory_keep_latest_k - 1), 0)]:
                self.folder.delete(old)
        except (Exception, CheckpointException) as e:
            logger.warning("in-memory save of step %d on rank %d failed (%s); nothing of it is used, training "
                           "continues", step, self.rank, e)
            self.folder.abort(step)
            return
        skipped = f" ({self.skipped} due save(s) skipped while it was written)" if self.skipped else ""
        self.skipped = 0
        logger.info("saved step %d to memory (%s): %s%s", step, self.folder.step_dir(step),
                    rate(folder_bytes(self.folder.step_dir(step)), time.perf_counter() - inflight.started), skipped)

    def _manifest(self, step: int, staging: Path) -> dict[str, Any]:
        checksums = collect_checksums(staging)  # first: it removes the writer's sidecars
        return {
            "format": MEMORY_FORMAT,
            "kind": MEMORY_KIND,
            "step": step,
            "run": self.run,
            "rank": self.rank,
            "world_size": self.world_size,
            "layout": self.layout,
            "durable_step": self.durable_step,
            "torch_version": torch.__version__,
            "created_unix": time.time(),
            "files": {p.name: p.stat().st_size for p in sorted(staging.iterdir()) if p.is_file()},
            "checksums": checksums,
        }

    def close(self, remove: bool) -> None:
        """Commit the save in flight and stop the writer; with ``remove`` (the job ended cleanly), delete this
        rank's RAM steps: nothing will restart from them."""
        try:
            self.finish()
        finally:
            self.saver.close()
        if remove and self.folder is not None:
            shutil.rmtree(self.folder.root, ignore_errors=True)
            try:
                self.folder.root.parent.rmdir()  # the run's folder, once its last rank is gone
            except OSError:
                pass
