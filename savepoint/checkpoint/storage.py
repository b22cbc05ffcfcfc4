"""The checkpoint folder: step layout, the commit protocol, discovery of committed steps, retention.

A step becomes visible only when complete. Every save writes into a hidden sibling
``.step-N.partial``; DCP fsyncs its data files and ``.metadata``; we add ``manifest.json`` and
publish the folder as ``step-N`` (``durable.publish``: fsync, rename, fsync the parent). A crash
before the rename leaves only a hidden leftover, which discovery ignores and the next start
removes. Re-saving an existing
step moves the old one aside first (``.step-N.replaced``), so one of the two is always complete.
Deletion renames to ``.step-N.trash`` before removing, so a half-deleted step is never visible.
Anything else in the folder (the writer's ``.savepoint.lock``, a user's notes) is neither a step
nor a leftover: discovery, cleanup and retention leave it alone.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Any

from savepoint.checkpoint.completeness import leave_mark, remove_mark
from savepoint.durable import DCP_MARKER, HF_INDEX, MANIFEST, fsync_dir, publish, write_file
from savepoint.errors import CheckpointError

logger = logging.getLogger(__name__)

STEP_DIR_RE = re.compile(r"^step-(\d+)$")
LEFTOVER_RE = re.compile(r"^\.step-(\d+)\.(partial|replaced|trash)$")


def folder_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path``, not following symlinks (a step's link is not its data)."""
    if os.path.islink(path):
        return 0
    total = 0
    for folder, _, names in os.walk(path):  # does not descend into symlinked folders
        for name in names:
            st = os.lstat(os.path.join(folder, name))
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def disk_full_hint(error_number: int | None, root: Path, keep_latest_k: int) -> str:
    """For a save that failed with ENOSPC, EDQUOT or EFBIG (the errno behind its failure): what to do, else ''."""
    if error_number in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f" ({shutil.disk_usage(root).free / 1e9:.2f} GB free now)"
        except OSError:
            free = ""
        quota = " or its quota is used up" if error_number == errno.EDQUOT else ""
        what = f"the disk holding {root} is full{quota}{free}"
    elif error_number == errno.EFBIG:
        what = (f"a file under {root} hit a size limit (file too large: the filesystem's maximum file size, "
                "or the process's `ulimit -f`)")
    else:
        return ""
    kept = "all steps" if keep_latest_k == 0 else f"{keep_latest_k} steps"
    return (f". Disk full: {what}. Free space there, or keep fewer checkpoints with a lower "
            f"--checkpoint.keep_latest_k (now {keep_latest_k}: {kept} kept), or move --checkpoint.folder "
            "to a bigger disk")


def checkpoint_location(dump_folder: str, folder: str) -> Any:
    """``--checkpoint.folder`` joined to ``--job.dump_folder``: an ``s3://`` URL (either one) or a local path.

    An absolute folder or URL replaces the dump folder, as an absolute path does in ``os.path.join``.
    """
    from savepoint.checkpoint.objstore import ObjectPath, is_url

    if is_url(folder):
        return ObjectPath(folder)
    if is_url(dump_folder):
        return ObjectPath(dump_folder) / folder if not os.path.isabs(folder) else Path(folder)
    return Path(dump_folder) / folder


def location(value: Any) -> Any:
    """A path the user gave: an ``ObjectPath`` for an ``s3://`` URL, else a local ``Path``."""
    from savepoint.checkpoint.objstore import ObjectPath, is_url

    return ObjectPath(value) if is_url(value) else Path(value)


def holds(folder: Any, name: str) -> bool:
    """Whether the folder (or object prefix) holds a file ``name``."""
    from savepoint.checkpoint.objstore import ObjectPath

    if isinstance(folder, ObjectPath):
        from savepoint.checkpoint.object_folder import listing

        return name in listing(folder)
    return (Path(folder) / name).is_file()


def open_folder(location: Any) -> CheckpointFolder:
    """The checkpoint folder at ``location``: on an object store, or on a filesystem."""
    from savepoint.checkpoint.objstore import ObjectPath, is_url

    if is_url(location):
        from savepoint.checkpoint.object_folder import ObjectFolder

        return ObjectFolder(ObjectPath(location))
    return CheckpointFolder(Path(location))


class CheckpointFolder:
    """One ``<dump_folder>/<checkpoint.folder>``: the steps in it and how they come and go."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def step_dir(self, step: int) -> Path:
        return self.root / f"step-{step}"

    def _hidden(self, step: int, state: str) -> Path:
        return self.root / f".step-{step}.{state}"

    def staging_dir(self, step: int) -> Path:
        """Where a save of ``step`` is written before it is committed."""
        return self._hidden(step, "partial")

    def ensure_writable(self) -> None:
        """Create the folder, or fail with a clear message if it cannot hold checkpoints.

        Raises:
            CheckpointError: the path is a file or the folder is not writable.
        """
        if self.root.exists() and not self.root.is_dir():
            raise CheckpointError(
                f"checkpoint folder {self.root} is a file, not a folder; "
                "point --checkpoint.folder (or --job.dump_folder) elsewhere"
            )
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"cannot create checkpoint folder {self.root}: {e.strerror}") from e
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise CheckpointError(
                f"checkpoint folder {self.root} is not writable; fix its permissions or "
                "use --checkpoint.load_only to only load"
            )

    # ---- discovery -------------------------------------------------------------------------

    def committed_steps(self) -> list[int]:
        """Steps with a complete ``step-N`` folder (DCP ``.metadata`` or an HF index), ascending."""
        if not self.root.is_dir():
            return []
        steps = []
        for entry in self.root.iterdir():
            match = STEP_DIR_RE.match(entry.name)
            if match and entry.is_dir() and self.is_committed(entry):
                steps.append(int(match.group(1)))
        return sorted(steps)

    @staticmethod
    def is_committed(step_dir: Path) -> bool:
        """Something is at the DCP or HF marker's name: whether it is sound is for loading to check.

        A marker that is a FIFO, symlink or folder still makes a committed step, so that loading it
        reports the damage (and auto-resume falls back) instead of skipping the step unannounced.
        """
        return os.path.lexists(step_dir / DCP_MARKER) or os.path.lexists(step_dir / HF_INDEX)

    def is_hf(self, step: int) -> bool:
        """A committed Hugging Face export (safetensors index, no DCP metadata)."""
        step_dir = self.step_dir(step)
        return (step_dir / HF_INDEX).is_file() and not (step_dir / DCP_MARKER).is_file()

    def latest_step(self) -> int | None:
        steps = self.committed_steps()
        return steps[-1] if steps else None

    def read_manifest(self, step: int) -> dict[str, Any] | None:
        """The step's manifest, checked (``manifest.read_manifest``); None without one (e.g. TorchTitan's).

        Raises:
            CorruptCheckpointError: something is at ``manifest.json`` but it is not a sound manifest.
        """
        from savepoint.checkpoint.manifest import read_manifest

        return read_manifest(self.step_dir(step))

    # ---- the commit protocol -----------------------------------------------------------------

    def clean_leftovers(self) -> None:
        """Remove what interrupted saves and deletions left behind; restore a replaced step if needed."""
        if not self.root.is_dir():
            return
        for entry in sorted(self.root.iterdir()):
            match = LEFTOVER_RE.match(entry.name)
            if not match:
                continue
            step, state = int(match.group(1)), match.group(2)
            target = self.step_dir(step)
            if state == "replaced" and not target.exists() and self.is_committed(entry):
                logger.warning("restoring %s: a re-save of step %d was interrupted", target, step)
                publish(entry, target)
                continue
            logger.warning("removing leftover %s from an interrupted save or deletion", entry)
            shutil.rmtree(entry, ignore_errors=True)

    def begin(self, step: int) -> Path:
        """Return an empty hidden staging folder for ``step``, holding only this save's mark (see completeness.py)."""
        staging = self.staging_dir(step)
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        leave_mark(staging)
        return staging

    def commit(self, step: int, manifest: bytes) -> Path:
        """Write the manifest (its bytes as given) and atomically publish ``step-N``; returns its path."""
        staging = self.staging_dir(step)
        if not (staging / DCP_MARKER).is_file() and not (staging / HF_INDEX).is_file():
            raise CheckpointError(f"refusing to commit {staging}: the writer produced no {DCP_MARKER}")
        remove_mark(staging)
        write_file(staging / MANIFEST, manifest)
        target = self.step_dir(step)
        replaced = self._hidden(step, "replaced")
        publish(staging, target, replaced=replaced)  # an old step-N is put back if the rename fails
        # The step is committed from here on: what follows can only warn, never report a failed save.
        try:
            if replaced.exists():
                shutil.rmtree(replaced)
        except OSError as e:
            logger.warning("step-%d is committed, but tidying up after it failed (%s); "
                           "the next start removes what is left", step, e)
        return target

    def abort(self, step: int) -> None:
        shutil.rmtree(self.staging_dir(step), ignore_errors=True)

    # ---- what a save needs from its storage (object stores: ``object_folder.ObjectFolder``) ----

    def lock(self) -> Any:
        """The one-writer-per-folder lock (not yet taken)."""
        from savepoint.checkpoint.lock import FolderLock

        return FolderLock(self.root)

    def dcp_writer(self, staging: Path) -> Any:
        """DCP's storage writer for a step's staging folder: it leaves checksum sidecars beside its files."""
        from savepoint.checkpoint.hashing import HashingWriter

        return HashingWriter(staging)

    def writer_view(self, staging: Path, rank: int) -> Any:
        from savepoint.checkpoint.completeness import writer_view

        return writer_view(staging, rank)

    def check_complete(self, step: int, staging: Path, views: list) -> None:
        from savepoint.checkpoint.completeness import check_complete

        check_complete(step, staging, views)

    def seal(self, staging: Path) -> tuple[dict[str, Any], dict[str, int]]:
        """Rank 0, before the manifest: drop the staging mark; every file's checksums and size."""
        from savepoint.checkpoint.hashing import collect_checksums

        remove_mark(staging)
        checksums = collect_checksums(staging)  # first: it removes the writers' sidecars
        return checksums, {p.name: p.stat().st_size for p in sorted(staging.iterdir()) if p.is_file()}

    def step_bytes(self, step: int) -> int:
        return folder_bytes(self.step_dir(step))

    # ---- retention ---------------------------------------------------------------------------

    def delete(self, step: int) -> None:
        trash = self._hidden(step, "trash")
        os.rename(self.step_dir(step), trash)
        fsync_dir(self.root)
        shutil.rmtree(trash)

    def retain_latest(self, keep: int, just_saved: int) -> list[int]:
        """Keep ``just_saved`` and the newest ``keep - 1`` committed steps before it; returns the deleted.

        ``keep == 0`` keeps all. Steps newer than ``just_saved`` (left by an earlier run when this
        one resumed from an older step) are never counted or deleted here.
        """
        if keep <= 0:
            return []
        older = [s for s in self.committed_steps() if s < just_saved]
        doomed = older[: max(len(older) - (keep - 1), 0)]
        for step in doomed:
            self.delete(step)
            logger.info("retention: deleted step-%d (keep_latest_k=%d)", step, keep)
        return doomed
