"""Opening the files a checkpoint (or a Hugging Face folder, or a config) names, and nothing else.

A checkpoint may come from anywhere, so a name in it is not trusted to mean a file inside it:

- :func:`inside` resolves a name relative to a folder and refuses absolute names, ``..``,
  and any symlink on the way (a symlinked data file or sub-folder could point at ``/etc/shadow``);
- :func:`open_regular` opens without following a final symlink and without blocking (a FIFO
  would block ``open`` forever), then refuses anything but a regular file (FIFO, device,
  socket, folder);
- :func:`read_regular` reads a whole file only if its size is within a stated bound, so a sparse
  multi-GB file or ``/dev/zero`` never turns into a multi-GB allocation;
- :func:`regular_size` is ``stat().st_size`` with the same rules, for size checks before reading.

Every refusal raises the caller's error class (``CheckpointError`` unless told otherwise) with one
line naming the path and what it is instead.
"""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from savepoint.errors import CheckpointError

_KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder", stat.S_IFLNK: "a symbolic link"}


def describe_mode(mode: int) -> str:
    """'a FIFO (named pipe)', 'a folder', ... for a ``st_mode`` that is not a regular file."""
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def inside(root: str | os.PathLike, name: str, what: str = "file", error: type[Exception] = CheckpointError) -> Path:
    """``root / name``, where ``name`` is a plain relative name that stays inside ``root``.

    Refuses absolute names, ``..``, empty names and NUL bytes, and symlinks among the components
    below ``root`` (``root`` itself may be anything the user chose). Components that do not exist
    yet are fine: the caller reports a missing file its own way.

    Raises:
        error: ``name`` leaves ``root``.
    """
    root = Path(root)
    if not isinstance(name, str) or not name or "\0" in name:
        raise error(f"{root}: the {what} name {name!r} is not a file name")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts:
        raise error(f"{root}: the {what} name {name!r} points outside the folder; a checkpoint only names its "
                    "own files, so this one is damaged or crafted. Nothing outside the folder was read")
    path = root
    for part in pure.parts:
        if part == ".":
            continue
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return root / pure
        except OSError as e:
            raise error(f"cannot read {path}: {e.strerror}") from None
        if stat.S_ISLNK(mode):
            raise error(f"{path} is a symbolic link; a checkpoint's {what}s must be regular files inside its "
                        "folder, so it was not followed. Replace the link with the file itself")
    return root / pure


def open_regular(path: str | os.PathLike, what: str = "file", error: type[Exception] = CheckpointError) -> BinaryIO:
    """Open ``path`` for reading if it is a regular file (not through a final symlink; never blocks).

    Raises:
        FileNotFoundError: it does not exist (callers report a missing file their own way).
        error: it is a symlink, FIFO, device, socket or folder, or cannot be opened.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:
        kind = _lstat_kind(path)
        if kind:
            raise error(f"{path} is {kind}, not a regular file: refusing to read it as a {what}") from None
        raise error(f"cannot open {path}: {e.strerror}") from None
    return _regular_file(fd, "rb", lambda kind: error(
        f"{path} is {kind}, not a regular file: refusing to read it as a {what}"))


def read_regular(path: str | os.PathLike, limit: int, what: str = "file",
                 error: type[Exception] = CheckpointError) -> bytes:
    """The bytes of a regular file no bigger than ``limit`` (checked before reading anything).

    Raises:
        FileNotFoundError: it does not exist.
        error: it is not a regular file, or is bigger than ``limit``.
    """
    with open_regular(path, what, error) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise error(f"{path} is {size:,} bytes, more than the {limit:,} a {what} can be: it is damaged or "
                        "not what it claims to be, so it was not read")
        data = f.read(limit + 1)
    if len(data) > limit:  # grew while being read
        raise error(f"{path} grew past {limit:,} bytes while being read; refusing it as a {what}")
    return data


def regular_size(path: str | os.PathLike, what: str = "file", error: type[Exception] = CheckpointError) -> int | None:
    """The size of a regular file, without following a final symlink; None if it does not exist.

    Raises:
        error: it is a symlink, FIFO, device, socket or folder.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path} is {describe_mode(st.st_mode)}, not a regular file: refusing to read it as a {what}")
    return st.st_size


def open_append_regular(path: str | os.PathLike, what: str = "file") -> BinaryIO:
    """Open ``path`` to append (created if missing, mode 0644), refusing a symlink or non-regular file.

    Raises:
        OSError: it cannot be opened (ENOSPC and friends pass through for the caller to handle).
        CheckpointError: it is a symlink, FIFO, device, socket or folder.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     0o644)
    except OSError:
        kind = _lstat_kind(path)
        if kind:
            raise CheckpointError(f"{path} is {kind}, not a regular file: refusing to write the {what} "
                                  "through it; remove it") from None
        raise
    return _regular_file(fd, "ab", lambda kind: CheckpointError(
        f"{path} is {kind}, not a regular file: refusing to write the {what} into it; remove it"))


def _regular_file(fd: int, mode: str, refuse: Callable[[str], Exception]) -> BinaryIO:
    """Wrap the descriptor ``fd`` (opened O_NONBLOCK) in a blocking file object if it is a regular
    file; else close it and raise ``refuse(what it is)``."""
    try:
        st_mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(st_mode):
            raise refuse(describe_mode(st_mode))
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
        return os.fdopen(fd, mode)
    except BaseException:
        os.close(fd)
        raise


def _lstat_kind(path: Path) -> str | None:
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) else describe_mode(mode)
