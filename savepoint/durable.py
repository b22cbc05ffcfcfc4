"""Durable publishing: every file and folder savepoint hands to a user appears whole or not at all.

Writers build their output under a hidden name (``.step-N.partial``, ``.out.partial``), write and
fsync each file (``write_file``, ``write_json``, or their own writer then ``fsync_file``), and then
``publish`` it: one ``rename`` makes it visible under its final name, and the parent folder is
fsynced so the new name survives a power cut. A crash before the rename leaves only the hidden
name, which readers never take for a result. This module also owns the names that mark a finished
checkpoint folder.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DCP_MARKER = ".metadata"  # DCP writes it last: a folder with it holds a whole DCP checkpoint
HF_INDEX = "model.safetensors.index.json"  # the weight map of a Hugging Face folder
MANIFEST = "manifest.json"  # savepoint's record of a committed step (files, checksums, config)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file's data to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (names created, renamed or removed in it) to stable storage."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: str | os.PathLike, data: bytes, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` and fsync it; ``exclusive`` refuses a name that already exists."""
    with open(path, "xb" if exclusive else "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_json(path: str | os.PathLike, obj: Any, sort_keys: bool = False) -> None:
    """Write ``obj`` as indented JSON (one trailing newline) and fsync it."""
    write_file(path, (json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n").encode("utf-8"))


def publish(src: str | os.PathLike, dst: str | os.PathLike, replaced: str | os.PathLike | None = None) -> None:
    """Make the finished file or folder ``src`` appear at ``dst`` in one step, durably.

    ``src`` is fsynced (a folder's entries; its files are the writer's to have fsynced), renamed
    to ``dst`` and ``dst``'s parent folder is fsynced. ``dst`` must not exist, except as an empty
    folder when ``src`` is a folder. With ``replaced``, an existing ``dst`` is first moved there
    (and put back if the rename fails); removing it afterwards is the caller's.

    Raises:
        FileExistsError: ``dst`` exists (a file, or a folder with entries) and ``replaced`` is None.
        OSError: the fsync or rename failed; ``dst`` is then as it was.
    """
    src, dst = Path(src), Path(dst)
    is_dir = src.is_dir() and not src.is_symlink()
    (fsync_dir if is_dir else fsync_file)(src)
    moved = False
    if replaced is not None and os.path.lexists(dst):
        os.rename(dst, replaced)
        moved = True
    try:
        if is_dir:
            os.rename(src, dst)  # replaces an empty folder only: one with entries fails (ENOTEMPTY)
        else:
            _move_file(src, dst)
    except OSError as e:
        if moved and not os.path.lexists(dst):
            os.rename(replaced, dst)  # type: ignore[arg-type]  # the old one back before reporting
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(errno.EEXIST, f"{dst} already exists", str(dst)) from None
        raise
    # Published from here on: a failure below only weakens durability, so it warns.
    try:
        fsync_dir(dst.parent)
    except OSError as e:
        logger.warning("%s is in place, but syncing its folder failed (%s): a power cut now could undo it",
                       dst, e.strerror or e)


def _move_file(src: Path, dst: Path) -> None:
    """Rename a file without replacing one at ``dst``: a hard link where the filesystem has them."""
    try:
        os.link(src, dst)  # unlike rename, fails if a file appeared at dst meanwhile
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
            raise
        if os.path.lexists(dst):  # no hard links here: check, then rename
            raise FileExistsError(errno.EEXIST, f"{dst} already exists", str(dst)) from None
        os.rename(src, dst)
        return
    os.unlink(src)
