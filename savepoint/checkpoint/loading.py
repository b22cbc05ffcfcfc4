"""Loading a DCP step into the model and the training components, on every rank alike.

``StepLoader`` opens a step only after every rank found it sound (manifest, checksums, a safe
``.metadata``), checks that it fits the model (``fit.py``) and holds every component asked for,
reads it with DCP, and hands the components their values only once every value was checked
(``states.StagedLoad``). Which step to load is the manager's decision; the fallback of auto-resume
past a corrupt step is here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.stateful import Stateful

from savepoint.checkpoint.compat import V03, detect_layout, from_v03_key, saved_model_keys, to_v03_key
from savepoint.checkpoint.coordination import Coordinator, Failure
from savepoint.checkpoint.fit import check_component, check_model_fits, flavor_hint
from savepoint.checkpoint.rates import rate
from savepoint.checkpoint.reader import VerifyingReader
from savepoint.checkpoint.safe_load import SafeLoadPlanner
from savepoint.checkpoint.states import DATALOADER, OPTIMIZER, TRAIN_STATE, ModelState, StagedLoad
from savepoint.checkpoint.storage import CheckpointFolder, holds
from savepoint.config.job_config import Checkpoint as CheckpointConfig
from savepoint.durable import DCP_MARKER
from savepoint.errors import CheckpointError, CorruptCheckpointError

logger = logging.getLogger(__name__)


class StepLoader:
    """Loads steps of ``folder`` (or another DCP folder) into ``model_state`` and ``states``.

    Args:
        cfg: the ``[checkpoint]`` section (``require_checksums``, ``exclude_from_loading``, ...).
        folder: the job's checkpoint folder.
        coord: the agreement among the job's ranks.
        model_state: the model, saved flat at the top level.
        states: the other components by key, each Stateful.
        flavor: this run's ``--model.flavor``, named when a step does not fit (None: not named).
    """

    def __init__(self, cfg: CheckpointConfig, folder: CheckpointFolder, coord: Coordinator,
                 model_state: ModelState, states: dict[str, Stateful], flavor: str | None):
        self.cfg, self.folder, self.coord = cfg, folder, coord
        self.model_state, self.states, self.flavor = model_state, states, flavor

    def load_step(self, step: int, committed: list[int], skipped: tuple[int, ...] = ()) -> int:
        """Load committed ``step`` of the folder (step 0, a seed, loads weights only); returns it.

        ``skipped``: newer steps auto-resume already found corrupt (logged as such, not as an earlier run's).
        """
        newer = [s for s in committed if s > step and s not in skipped]
        if newer:
            logger.warning("loading step %d while newer steps %s exist from an earlier run; they are "
                           "replaced as training reaches them, until then auto-resume would pick them",
                           step, newer)
        if self.cfg.initial_load_path:
            logger.info("skipping --checkpoint.initial_load_path=%s: resuming from %s",
                        self.cfg.initial_load_path, self.folder.step_dir(step))
        # Step 0 is a seed checkpoint: weights only, training starts from scratch.
        self.load_from(self.folder.step_dir(step), model_only=(step == 0), source_step=step)
        if step == 0:
            logger.info("step-0 is a seed checkpoint: loaded its weights, training starts at step 1")
        return step

    def resume_latest(self, committed: list[int]) -> int:
        """Load the newest committed step; if it is corrupt, warn loudly and take the one before, and so on.

        Raises:
            CorruptCheckpointError: the newest step is corrupt and ``fail_on_corruption`` is set, or
                every DCP step is corrupt.
        """
        candidates = [s for s in reversed(committed) if not self.folder.is_hf(s)]
        problems, corrupt = [], []
        for step in candidates:
            try:
                return self.load_step(step, committed, tuple(corrupt))
            except CorruptCheckpointError as e:
                problems.append(f"step-{step}: {e}")
                corrupt.append(step)
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

    def load_initial(self, path: Path) -> int:
        """Load ``--checkpoint.initial_load_path``: model only (returns 0) or in full (returns its step)."""
        if not holds(path, DCP_MARKER):
            raise CheckpointError(
                f"--checkpoint.initial_load_path={path} is not a DCP checkpoint folder (no {DCP_MARKER}); "
                "point it at a step-N folder"
            )
        self.load_from(path, model_only=self.cfg.initial_load_model_only, source_step=None)
        if self.cfg.initial_load_model_only:
            return 0
        return int(getattr(self.states.get(TRAIN_STATE), "step", 0))

    def hf_step_error(self, step: int, committed: list[int]) -> CheckpointError:
        """Why committed ``step``, a Hugging Face export, cannot be resumed from, and what to do instead."""
        dcp_steps = [s for s in committed if s != step and not self.folder.is_hf(s)]
        hint = (f"resume from the latest DCP step with --checkpoint.load_step {dcp_steps[-1]}, or "
                if dcp_steps else "")
        return CheckpointError(
            f"{self.folder.step_dir(step)} is a Hugging Face export (the final save with "
            f"--checkpoint.last_save_in_hf): it holds only weights, no optimizer or data position, so training "
            f"cannot resume from it; {hint}start a new run from its weights with --checkpoint.initial_load_path "
            f"{self.folder.step_dir(step)} --checkpoint.initial_load_in_hf and an empty --checkpoint.folder"
        )

    def open(self, path: Path) -> tuple[VerifyingReader, Any]:
        """A verifying reader for ``path`` and its metadata, after every rank agreed they are sound.

        Raises:
            CorruptCheckpointError / UnsafeCheckpointError / CheckpointError: on every rank alike.
        """
        error: BaseException | None = None
        reader, saved = None, None
        try:
            # The manifest (bounded, self-checked, schema-checked) and the rule for steps without
            # checksums; then .metadata: its checksum, a safe unpickle, every item within a regular
            # file of the step and every shape backed by stored bytes, before any byte is read.
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

    def load_from(self, path: Path, model_only: bool, source_step: int | None) -> None:
        """Load the DCP folder ``path``: the model, and unless ``model_only`` every component not excluded.

        Raises:
            CheckpointError (or its Corrupt/Unsafe kinds): on every rank alike; no component changed.
        """
        reader, saved = self.open(path)
        model_sd = self.model_state.state_dict()
        staged = StagedLoad()  # every component's values are checked before any component changes
        state = self._requested(path, saved.state_dict_metadata, model_sd, staged, model_only, source_step)
        start = time.perf_counter()
        try:
            dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(), process_group=self.coord.group)
        except (Exception, CheckpointException) as e:
            failure = Failure.of(e)
            raise failure.error(f"loading {path} failed: {failure.message}") from e
        staged.apply(path, saved)
        self.model_state.load_state_dict(model_sd)
        seconds = time.perf_counter() - start
        skipped = [n for n in self.states if n in self.cfg.exclude_from_loading]
        logger.info("loaded %s (%s%s): %s", path, "model only" if model_only else "full",
                    f", excluded {','.join(skipped)}" if skipped and not model_only else "",
                    rate(_bytes_read(saved, state), seconds))

    def _requested(self, path: Path, saved_keys: dict[str, Any], model_sd: dict[str, Any], staged: StagedLoad,
                   model_only: bool, source_step: int | None) -> dict[str, Any]:
        """What to ask DCP for, each under the name the step stores it by, after checking it is there."""
        # TorchTitan 0.3 stores some tensors under new names; request each under the name it has.
        names = saved_model_keys(model_sd, saved_keys)
        v03 = detect_layout(saved_keys) == V03
        if v03:
            logger.info("%s is in TorchTitan 0.3 key layout (attention.qkv_linear.*, lm_head): loading by those names",
                        path)
        check_model_fits(saved_keys, {k: t.shape for k, t in model_sd.items()}, str(path), names=names,
                         hint=lambda: flavor_hint(path, self.flavor))
        state: dict[str, Any] = {names[k]: t for k, t in model_sd.items()}
        if model_only:
            return state
        for name, component in self.states.items():
            if name in self.cfg.exclude_from_loading:
                continue
            if name == DATALOADER and titan_dataloader_state(saved_keys):
                logger.warning("%s holds TorchTitan's data-loader state (%s), which cannot describe savepoint's data "
                               "stream: it is skipped and the data starts again from its first sample; model, "
                               "optimizer, lr schedule and step are restored (--checkpoint.exclude_from_loading "
                               "dataloader skips it without this warning)", path,
                               ", ".join(titan_dataloader_state(saved_keys)))
                continue
            check_component(saved_keys, name, path, self.folder, source_step)
            component = staged.wrap(name, component)
            if name == TRAIN_STATE:
                component = SavedRNGOnly(component, saved_keys)
            if name == OPTIMIZER and v03:
                component = RenamedKeys(component, to_v03_key, from_v03_key)
            state[name] = component
        return state


def titan_dataloader_state(saved_keys: Any) -> list[str]:
    """The checkpoint's TorchTitan data-loader entries (``dataloader.dp_rank_<r>``, pickled per rank).

    Empty when the checkpoint holds savepoint's own data position (``dataloader.sample_index``).
    """
    if f"{DATALOADER}.sample_index" in saved_keys:
        return []
    return sorted(k for k in saved_keys if k.startswith(f"{DATALOADER}.dp_rank_"))


class RenamedKeys(Stateful):
    """A Stateful whose flat keys are stored under other names (the optimizer's FQNs in TorchTitan 0.3)."""

    def __init__(self, inner: Stateful, to_saved: Callable[[str], str], from_saved: Callable[[str], str]):
        self.inner, self.to_saved, self.from_saved = inner, to_saved, from_saved

    def state_dict(self) -> dict[str, Any]:
        return {self.to_saved(k): v for k, v in self.inner.state_dict().items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict({self.from_saved(k): v for k, v in state_dict.items()})


class SavedRNGOnly(Stateful):
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


__all__ = ["RenamedKeys", "SavedRNGOnly", "StepLoader", "titan_dataloader_state"]
