"""Checksums written with every step: hashing streams, per-file sidecars, and the commit-time collection.

DCP writes each ``.distcp`` through :class:`HashingFileSystem`, whose stream hashes the bytes
while they are written (on a second thread, so hashing overlaps the write system call). DCP asks
the stream for its position before and after every item, so the stream cuts a new *segment*
there: segments line up with the stored items. Each finished file leaves a hidden sidecar with its
size and segment hashes; at commit rank 0 folds the sidecars into the manifest
(:func:`collect_checksums`) and hashes the files no writer hashed (``.metadata``, a Hugging Face
export's files) in fixed blocks.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import xxhash
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

from savepoint.durable import MANIFEST
from savepoint.errors import CheckpointError

ALGORITHM = "xxh3_128"
SIDECAR_SUFFIX = ".sums.json"
BLOCK = 64 << 20  # segment size for files hashed after the fact
OVERLAP_MIN = 1 << 20  # writes at least this big are hashed on the helper thread


def hexdigest(data: Any) -> str:
    """The checksum of ``data`` (bytes or a buffer), as the manifest stores it."""
    return xxhash.xxh3_128(data).hexdigest()


class _HashingStream(io.RawIOBase):
    """A write-only file that hashes what passes through it, one hash per segment between ``tell()``s."""

    def __init__(self, raw: IO[bytes]):
        super().__init__()
        self.raw = raw
        self.pos = 0
        self.seg_start = 0
        self.hasher = xxhash.xxh3_128()
        self.segments: list[list[Any]] = []
        self.pool: ThreadPoolExecutor | None = None
        # The first write error (ENOSPC, EFBIG, EIO...): torch's zip writer replaces it with its own
        # "unexpected pos" RuntimeError, so create_stream raises this one instead.
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        try:
            return self._write(b)
        except OSError as e:
            self.error = self.error or e
            raise

    def _write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        if view.nbytes >= OVERLAP_MIN:
            # xxhash releases the GIL: hash on the helper thread while this one is in write(2).
            if self.pool is None:
                self.pool = ThreadPoolExecutor(1, thread_name_prefix="savepoint-hash")
            pending = self.pool.submit(self.hasher.update, view)
            try:
                written = self.raw.write(view)
            finally:
                pending.result()
        else:
            self.hasher.update(view)
            written = self.raw.write(view)
        if written != view.nbytes:  # a buffered file writes everything or raises
            raise OSError(f"short write: {written} of {view.nbytes} bytes")
        self.pos += view.nbytes
        return view.nbytes

    def _cut(self) -> None:
        if self.pos > self.seg_start:
            self.segments.append([self.seg_start, self.pos, self.hasher.hexdigest()])
            self.hasher.reset()
            self.seg_start = self.pos

    def tell(self) -> int:
        self._cut()
        return self.pos

    def seekable(self) -> bool:
        return False

    def flush(self) -> None:
        self.raw.flush()

    def fileno(self) -> int:
        return self.raw.fileno()

    def close(self) -> None:
        if self.closed:
            return
        self._cut()
        if self.pool is not None:
            self.pool.shutdown()
        try:
            super().close()  # flushes
        finally:
            self.raw.close()


def sidecar_path(data_file: Path) -> Path:
    return data_file.with_name(f".{data_file.name}{SIDECAR_SUFFIX}")


class HashingFileSystem(FileSystem):
    """DCP's local file system, with every ``.distcp`` hashed as it is written.

    It also refuses to go on for a trainer that died: a background writer process outlives a
    SIGKILLed trainer, and must not write a ``.metadata`` into a staging folder that a restarted
    job may be using by then. ``owner`` is the trainer's pid; in a writer process it is the parent.
    """

    def __init__(self) -> None:
        super().__init__()
        self.owner = os.getpid()

    def _check_owner(self, path: Path) -> None:
        if os.getpid() != self.owner and os.getppid() != self.owner:
            raise CheckpointError(f"not writing {path}: the training process {self.owner} that started this "
                                  "save is gone")

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        self._check_owner(Path(new_path))
        super().rename(path, new_path)

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[io.IOBase]:
        path = Path(path)
        if mode != "rb":
            self._check_owner(path)
        if mode != "wb" or not path.name.endswith(".distcp"):
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        stream = _HashingStream(path.open("wb"))
        try:
            yield stream
        except Exception as e:
            if stream.error is not None and e is not stream.error:
                raise stream.error from e  # the errno, not the zip writer's "unexpected pos"
            raise
        finally:
            stream.close()
        record = {"file": path.name, "size": stream.pos, "algorithm": ALGORITHM, "segments": stream.segments}
        sidecar_path(path).write_text(json.dumps(record), encoding="utf-8")


class HashingWriter(FileSystemWriter):
    """``FileSystemWriter`` (same files, same layout) that leaves checksum sidecars next to its files.

    Args:
        compute_crc32: whether ``torch.save`` (which writes each item) also computes the zip CRC-32
            of every record. Off by default: the sidecars' xxh3 already covers every byte, and the
            CRC, computed inline at ~1.3-1.5 GB/s on this machine's cores, was about half of a sync
            save's time. ``torch.load`` and so every DCP reader load the files either way.
    """

    def __init__(self, path: str | os.PathLike, compute_crc32: bool = False, **kwargs: Any):
        super().__init__(path, **kwargs)
        self.fs = HashingFileSystem()
        self.compute_crc32 = compute_crc32

    def write_data(self, plan: Any, planner: Any) -> Any:
        if self.compute_crc32:
            return super().write_data(plan, planner)
        # torch.save reads this process-wide flag when it opens each record; DCP's write_data
        # returns only once every file is written, and a rank writes one save at a time.
        from torch.utils.serialization import config

        before = config.save.compute_crc32
        config.save.compute_crc32 = False
        try:
            return super().write_data(plan, planner)
        finally:
            config.save.compute_crc32 = before


def hash_file(path: Path, block: int = BLOCK) -> dict[str, Any]:
    """Size and per-block hashes of a file written without a hashing stream."""
    segments = []
    with open(path, "rb") as f:
        start = 0
        while True:
            data = f.read(block)
            if not data:
                break
            segments.append([start, start + len(data), hexdigest(data)])
            start += len(data)
    return {"size": start, "segments": segments}


def collect_checksums(staging: Path) -> dict[str, Any]:
    """Rank 0 at commit: every file's checksums, from the writers' sidecars or hashed now; sidecars removed.

    Raises:
        CheckpointError: a sidecar disagrees with its file's size (the write did not finish).
    """
    files: dict[str, Any] = {}
    sidecars = sorted(staging.glob(f".*{SIDECAR_SUFFIX}"))
    for sidecar in sidecars:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
        data_file = staging / record["file"]
        actual = data_file.stat().st_size if data_file.is_file() else None
        if actual != record["size"]:
            raise CheckpointError(f"{data_file}: the writer hashed {record['size']} bytes but the file has "
                                  f"{actual}; refusing to commit an incomplete write")
        files[record["file"]] = {"size": record["size"], "segments": record["segments"]}
    for path in sorted(staging.iterdir()):
        if path.is_file() and path.name not in files and path.name != MANIFEST and path not in sidecars:
            files[path.name] = hash_file(path)
    for sidecar in sidecars:
        sidecar.unlink()
    return {"algorithm": ALGORITHM, "files": files}

