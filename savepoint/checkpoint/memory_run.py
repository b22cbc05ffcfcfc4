"""The in-memory tier's run file: which run a checkpoint folder's RAM steps belong to, and where they are.

``.savepoint.run`` in the durable checkpoint folder holds a random run id, bound to that folder's
path and inode, and the memory folder its RAM steps live in (``<memory_folder>/<run>/rank-<R>``).
A restart of the same job finds its run id again; a copy, move or re-creation of the folder gets
a new one, so it never loads (or removes) another run's RAM steps. See ``memory.py``.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from savepoint.checkpoint.storage import CheckpointFolder
from savepoint.durable import fsync_dir, write_file
from savepoint.errors import CheckpointError
from savepoint.safe_io import read_regular

RUN_FILE = ".savepoint.run"  # in the durable checkpoint folder: the run id, and where its RAM copies live
RUN_FILE_LIMIT = 4096


def _folder_identity(root: Path) -> list[Any]:
    """The durable folder as the run file binds it: its absolute path and its inode, so that a copy (``cp -r``),
    a move or a folder recreated under the same name is another run."""
    st = os.stat(root)
    return [str(Path(root).absolute()), st.st_dev, st.st_ino]


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(read_regular(path, RUN_FILE_LIMIT, "run file", CheckpointError))
    except (OSError, ValueError, CheckpointError):
        return None
    return record if isinstance(record, dict) else None


def run_id(durable_root: Path, memory_folder: Path) -> str:
    """The run id in ``durable_root/.savepoint.run`` (rank 0, which holds the folder lock).

    A new id is made when there is none, when the file names another folder (the folder was copied,
    moved or recreated: its RAM steps are another run's), or when it is damaged.
    """
    path = durable_root / RUN_FILE
    record = _read_record(path) or {}
    identity = _folder_identity(durable_root)
    run = record.get("run")
    if not _is_run_id(run) or record.get("folder") != identity:
        run = uuid.uuid4().hex
    wanted = {"run": run, "folder": identity, "memory_folder": str(memory_folder)}
    if record != wanted:
        tmp = path.with_name(RUN_FILE + ".tmp")
        write_file(tmp, (json.dumps(wanted) + "\n").encode())
        os.replace(tmp, path)
        fsync_dir(durable_root)
    return run


def read_run(durable_root: Path) -> dict[str, Any] | None:
    """``{"run", "folder", "memory_folder"}`` of a checkpoint folder whose job used the in-memory tier, else None."""
    record = _read_record(Path(durable_root) / RUN_FILE)
    if record is not None and _is_run_id(record.get("run")) and isinstance(record.get("memory_folder"), str):
        return record
    return None


def _is_run_id(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 32 and all(c in "0123456789abcdef" for c in value)


def memory_steps(durable_root: Path) -> dict[str, list[int]]:
    """The committed RAM steps of a checkpoint folder's run on this node, by rank folder (for ``inspect``)."""
    record = read_run(durable_root)
    if record is None:
        return {}
    run_root = Path(record["memory_folder"]) / record["run"]
    if not run_root.is_dir():
        return {}
    return {entry.name: CheckpointFolder(entry).committed_steps()
            for entry in sorted(run_root.iterdir()) if entry.name.startswith("rank-") and entry.is_dir()}
