"""One writer per checkpoint folder: an advisory lock held for the lifetime of the job that saves there.

Two jobs saving into one folder would delete each other's checkpoints: each one's start-up removes
the other's unfinished ``.step-N.partial`` as a leftover, and each one's retention counts the
other's steps. So the job that prepares the folder for saving (rank 0) takes ``.savepoint.lock``
in it with ``flock(LOCK_EX | LOCK_NB)`` and writes who it is into the file; a second job fails at
start with a message naming the holder.

The kernel drops a flock when its holder dies, however it dies, so a lock file left by a killed
job is not "held": the next job takes it over and warns, naming the job that left it. A clean
release (``close()``, or interpreter exit) removes the file. The file is removed only by a holder,
while it holds the lock, and an acquirer checks after locking that the path still names the file
it locked, so two jobs can never both believe they hold it.

The lock file is opened without following a symlink and must be a regular file: a symlink, FIFO
or folder in its place is refused, never written through. Each save checks the lock still stands
(``ensure_held``): if the folder was deleted or the lock file replaced meanwhile, the job takes the
lock again in the folder as it is now, or stops if another job holds it by then.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import logging
import os
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Any

from savepoint.errors import CheckpointError, FatalCheckpointError

logger = logging.getLogger(__name__)

LOCK_NAME = ".savepoint.lock"

_held: set[FolderLock] = set()  # released at interpreter exit if still held


def _holder_info() -> dict[str, Any]:
    now = time.time()
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(now)),
        "started_unix": now,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "a job whose details are not written yet (it is starting)"
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {holder.get('started', '?')}"
            f" ({holder.get('command', '?')})")


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        raw = os.pread(fd, 64 * 1024, 0)
        return json.loads(raw) if raw.strip() else None
    except (OSError, ValueError):
        return None


class FolderLock:
    """The lock file ``<root>/.savepoint.lock``; ``acquire()`` fails fast if another job holds it.

    Args:
        root: the checkpoint folder (it must exist).
    """

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock and write this job's details into it; a no-op if this object holds it already.

        Raises:
            CheckpointError: another live job (or another manager in this process) holds the lock,
                or the folder's filesystem cannot lock.
        """
        if self._fd is not None:
            return
        for _ in range(100):
            fd = self._open_and_lock()
            if self._still_linked(fd):
                break
            os.close(fd)  # its holder released and removed it between our open and flock: lock the new one
        else:
            raise CheckpointError(f"could not lock {self.path}: the file keeps being replaced; "
                                  "is another job starting on the same --checkpoint.folder?")
        previous = _read_holder(fd)
        if previous:
            logger.warning("taking over the lock on checkpoint folder %s: it was left by %s, which is gone "
                           "(killed or crashed without releasing it); leftovers of its interrupted save, if any, "
                           "are removed now", self.root, _describe(previous))
        payload = json.dumps(_holder_info(), indent=2).encode() + b"\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, payload, 0)
        os.fsync(fd)
        self._fd = fd
        _held.add(self)

    def ensure_held(self) -> None:
        """At each save: the lock file at ``path`` is still the one this object locked; if not, take it again.

        Deleting the checkpoint folder (or the lock file) mid-run would otherwise leave the job
        saving into a folder that no lock guards, where a second job could start writing too.

        Raises:
            FatalCheckpointError: the lock was lost and cannot be taken again (another job holds it now).
        """
        if self._fd is None or self._still_linked(self._fd):
            return
        lost = "was deleted" if not self.root.is_dir() else "lost its lock file (deleted or replaced)"
        fd, self._fd = self._fd, None
        _held.discard(self)
        os.close(fd)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.acquire()
        except (OSError, CheckpointError) as e:
            reason = e.strerror if isinstance(e, OSError) else str(e)
            raise FatalCheckpointError(
                f"checkpoint folder {self.root} {lost} while this job was saving into it, and the job could not "
                f"lock it again ({reason}); stopping rather than writing into a folder another job may be using. "
                "Do not delete or replace the checkpoint folder or its .savepoint.lock while a job runs") from None
        logger.warning("checkpoint folder %s %s while this job was saving into it: took its lock again; steps "
                       "deleted with it are gone. Do not delete the checkpoint folder or its %s while a job runs",
                       self.root, lost, LOCK_NAME)

    def _open_and_lock(self) -> int:
        try:
            # O_NOFOLLOW: a symlink planted here must not make the lock overwrite its target;
            # O_NONBLOCK: a FIFO must not block the open.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as e:
            kind = _kind(self.path)
            if kind:
                raise CheckpointError(self._not_a_file_message(kind)) from None
            raise CheckpointError(f"cannot create the lock file {self.path}: {e.strerror}") from e
        kind = "" if stat.S_ISREG(os.fstat(fd).st_mode) else _kind(self.path) or "not a regular file"
        if kind:
            os.close(fd)
            raise CheckpointError(self._not_a_file_message(kind))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise CheckpointError(self._busy_message(holder)) from None
            raise CheckpointError(f"cannot lock {self.path} ({e.strerror}): the filesystem of the checkpoint "
                                  "folder may not support file locks; use a local or lock-capable "
                                  "filesystem for --checkpoint.folder") from e
        return fd

    def _not_a_file_message(self, kind: str) -> str:
        return (f"the lock file {self.path} is {kind}, not a regular file, so savepoint does not use it (it never "
                "writes through one); remove it (savepoint creates the lock file itself) and start the job again")

    def _still_linked(self, fd: int) -> bool:
        try:
            here = os.lstat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return False
        mine = os.fstat(fd)
        return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)

    def _busy_message(self, holder: dict[str, Any] | None) -> str:
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            return (f"checkpoint folder {self.root} is already locked by this process (pid {os.getpid()}): "
                    "close the first CheckpointManager (checkpointer.close()) before opening another one on "
                    "the same folder")
        return (f"checkpoint folder {self.root} is in use by another job: {_describe(holder)}. Two jobs saving "
                "into one folder would delete each other's checkpoints. Wait for that job to end (or stop it), "
                "or give this job its own folder with --checkpoint.folder or --job.dump_folder "
                "(to only read the folder, use --checkpoint.load_only)")

    def release(self) -> None:
        """Remove the lock file and drop the lock; a no-op if not held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        _held.discard(self)
        try:
            if self._still_linked(fd):
                os.unlink(self.path)  # while still locked: nobody can lock this file after it is gone
        except OSError as e:
            logger.warning("could not remove the lock file %s (%s); the next job takes it over", self.path, e)
        finally:
            os.close(fd)  # drops the flock


def _kind(path: Path) -> str:
    """'a symbolic link', 'a FIFO', ... for what is at ``path`` if it is not a regular file; '' otherwise."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return ""
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISDIR, "a folder"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device")):
        if test(mode):
            return name
    return ""


@atexit.register
def _release_all() -> None:
    for lock in list(_held):
        lock.release()


__all__ = ["FolderLock", "LOCK_NAME"]
