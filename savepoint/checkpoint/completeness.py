"""Whether the staging folder rank 0 is about to commit holds what every rank wrote.

Every rank writes its shards into its own view of ``.step-N.partial``, and rank 0 alone publishes
that folder. If the ranks' views are not one folder (node-local disks, or a ``--job.dump_folder``
that differs between nodes), rank 0 would publish only its own shards, a step that names files it
does not hold. So rank 0's ``begin`` leaves a random mark in the staging folder; after writing,
each rank reports the mark it sees there and the files its writer wrote, with the sizes the
writer counted (from the checksum sidecars); rank 0 commits only if every rank saw its mark, each
reported file is there with that size, and every file ``.metadata`` names is there.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from savepoint.checkpoint.hashing import SIDECAR_SUFFIX
from savepoint.checkpoint.reader import VerifyingReader
from savepoint.durable import DCP_MARKER
from savepoint.errors import CheckpointError, FatalCheckpointError
from savepoint.safe_io import read_regular, regular_size

STAGING_MARK = ".savepoint.staging"  # rank 0's mark in a staging folder; removed before the commit
_MARK_BYTES = 32


@dataclass(frozen=True)
class WriterView:
    """What one rank saw and wrote in its staging folder (sent to rank 0 with the save's outcome)."""

    rank: int
    host: str
    folder: str  # the checkpoint folder this rank saves into, as it names it
    mark: str | None  # the mark it read in its staging folder; None: no mark there
    files: dict[str, int] = field(default_factory=dict)  # data files its writer wrote -> bytes written


def leave_mark(staging: Path) -> None:
    """Rank 0, in a new staging folder: a random mark that only this save's staging folder holds."""
    (staging / STAGING_MARK).write_text(secrets.token_hex(_MARK_BYTES // 2), encoding="ascii")


def remove_mark(staging: Path) -> None:
    (staging / STAGING_MARK).unlink(missing_ok=True)


def _read_mark(staging: Path) -> str | None:
    try:
        return read_regular(staging / STAGING_MARK, _MARK_BYTES).decode("ascii", "replace")
    except (OSError, CheckpointError):
        return None  # missing, or not a file savepoint wrote


def writer_view(staging: Path, rank: int) -> WriterView:
    """This rank's view after its write: rank 0's mark as seen here, and the files this rank's writer wrote.

    DCP names a rank's data files ``__<rank>_<n>.distcp``; the writer left a sidecar with the byte
    count of each (see ``hashing.HashingFileSystem``).
    """
    files: dict[str, int] = {}
    if staging.is_dir():
        for sidecar in sorted(staging.glob(f".__{rank}_*{SIDECAR_SUFFIX}")):
            try:
                record = json.loads(read_regular(sidecar, 1 << 24))
                files[str(record["file"])] = int(record["size"])
            except (OSError, CheckpointError, ValueError, KeyError, TypeError):
                files[sidecar.name] = -1  # rank 0 reports it as unreadable
    return WriterView(rank, socket.gethostname(), os.path.abspath(staging.parent), _read_mark(staging), files)


def check_complete(step: int, staging: Path, views: list[WriterView],
                   size_of: Callable[[str], int | None] | None = None, metadata: Any = None) -> None:
    """Rank 0, before committing: every rank wrote into this folder, and every file is here in full.

    ``size_of(name)`` gives a file's size (None: missing); the default looks in the local folder.
    ``metadata`` is the step's ``.metadata`` (read by the caller; None: read it here, if there is one).

    Raises:
        FatalCheckpointError: some rank saves into another folder than rank 0's (not shared).
        CheckpointError: a file a rank wrote, or one ``.metadata`` names, is missing or has another size.
    """
    own = views[0]
    if own.mark is None:
        raise CheckpointError(f"refusing to commit {staging}: rank 0's mark in it is gone (was the folder "
                              "deleted or replaced during the save?)")
    elsewhere = [v for v in views if v.mark != own.mark]
    if elsewhere:
        raise FatalCheckpointError(not_shared_message(step, own, elsewhere))
    size_of = size_of or (lambda name: _size(staging / name))
    problems = []
    for view in views:
        for name, size in view.files.items():
            actual = size_of(name)
            if actual != size:
                problems.append(f"rank {view.rank} wrote {name} ({size} bytes), here "
                                + ("it is missing" if actual is None else f"it has {actual} bytes"))
    if metadata is None and isinstance(staging, Path) and (staging / DCP_MARKER).is_file():  # else an HF export
        metadata = VerifyingReader(staging).read_metadata()
    if metadata is not None:
        problems += _missing_from_metadata(metadata, size_of)
    if problems:
        raise CheckpointError(f"refusing to commit {staging}: it does not hold every file of the step: "
                              + "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5
                                                           else ""))


def _size(path: Path) -> int | None:
    try:
        return regular_size(path)
    except CheckpointError:
        return -2  # not a regular file: never the size a writer reported


def _missing_from_metadata(metadata: Any, size_of: Callable[[str], int | None]) -> list[str]:
    """Files that ``.metadata`` (written by DCP's coordinator) places items in, but which are absent or short."""
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    problems = []
    for name, end in sorted(needed.items()):
        actual = size_of(name)
        if actual is None or actual < end:
            problems.append(f"{DCP_MARKER} places items in {name} up to byte {end}, here "
                            + ("it is missing" if actual is None else f"it has {actual} bytes"))
    return problems


def not_shared_message(step: int, own: WriterView, elsewhere: list[WriterView]) -> str:
    """One line: which ranks save where, and that every rank must see one folder."""
    groups: dict[tuple[str, str], list[int]] = {}
    for view in elsewhere:
        groups.setdefault((view.host, view.folder), []).append(view.rank)
    where = "; ".join(
        f"{'rank' if len(ranks) == 1 else 'ranks'} {', '.join(map(str, ranks))} on host {host} "
        f"{'saves' if len(ranks) == 1 else 'save'} into {folder}"
        for (host, folder), ranks in groups.items())
    return (f"the checkpoint folder is not shared between ranks: rank 0 on host {own.host} saves into {own.folder}, "
            f"but {where}, and {'that is' if len(groups) == 1 else 'those are'} not the same folder (rank 0's "
            f"files are not there), so step {step} could hold only some ranks' shards; nothing was committed. "
            "Every rank must save into one folder that all of them see: put --job.dump_folder (or "
            "--checkpoint.folder) on a filesystem shared by every node (NFS, Lustre, GPFS, ...), at the same path "
            "on every node")
