"""DCP's storage writer and reader for object-store steps, with savepoint's checksums and checks.

:class:`ObjectHashingWriter` is :class:`~savepoint.checkpoint.hashing.HashingWriter` writing each
file as one object (a streaming multipart upload through s3fs), hashed on the way, with the same
sidecar per data file. :class:`ObjectReader` is
:class:`~savepoint.checkpoint.reader.VerifyingReader` reading objects: each item is one ranged GET
of the checksum segments that cover it, so a resharded load fetches only the bytes it needs.
"""

from __future__ import annotations

import bisect
import dataclasses
import io
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import PurePosixPath
from typing import IO, Any

from savepoint.checkpoint.hashing import ALGORITHM, HashingFileSystem, HashingWriter, _HashingStream, sidecar_path
from savepoint.checkpoint.object_folder import listing, read_object, write_object
from savepoint.checkpoint.objstore import ObjectPath, client, store_error
from savepoint.checkpoint.reader import VerifyingReader
from savepoint.durable import DCP_MARKER
from savepoint.errors import CheckpointError, CorruptCheckpointError

_READ_BLOCK = 8 << 20  # s3fs's block for reads outside the verified path (an unverified checkpoint)
GAP = 1 << 20  # one GET reads on over a gap of at most this many unneeded bytes ...
SPAN = 64 << 20  # ... up to this many bytes in all


def _object_name(root: Any, name: Any, what: str) -> ObjectPath:
    """``root / name`` for a plain object name (no '/', '..' or absolute names: a step names only its own objects)."""
    if not isinstance(name, str) or not name or "\0" in name or "/" in name or name in (".", ".."):
        raise CorruptCheckpointError(f"{root}: the {what} name {name!r} is not an object of the step; a checkpoint "
                                     "only names its own files, so this one is damaged or crafted. Nothing outside "
                                     "the step was read")
    return root / name


class ObjectFiles(HashingFileSystem):
    """DCP's file access on an object store: writes hash as they stream; reads are ranged GETs."""

    def concat_path(self, path: Any, suffix: str) -> Any:
        return ObjectPath(path) / suffix

    def init_path(self, path: Any) -> Any:
        return ObjectPath(path)

    def mkdir(self, path: Any) -> None:
        return None  # prefixes need no creating

    def exists(self, path: Any) -> bool:
        return ObjectPath(path).name in listing(ObjectPath(path).parent)

    def rm_file(self, path: Any) -> None:
        try:
            client().rm_file(ObjectPath(path).path)
        except FileNotFoundError:
            pass
        except Exception as e:  # noqa: BLE001
            raise store_error(e, path, "deleting") from None

    def rename(self, path: Any, new_path: Any) -> None:
        self._check_owner(new_path)
        try:
            client().mv(ObjectPath(path).path, ObjectPath(new_path).path)
        except Exception as e:  # noqa: BLE001
            raise store_error(e, new_path, "writing") from None

    def ls(self, path: Any) -> list[str]:
        return sorted(listing(ObjectPath(path)))

    @contextmanager
    def create_stream(self, path: Any, mode: str) -> Iterator[io.IOBase]:
        path = ObjectPath(path)
        if mode == "rb":
            try:
                stream = client().open(path.path, "rb", block_size=_READ_BLOCK, cache_type="none")
            except FileNotFoundError:
                raise CorruptCheckpointError(f"{path} is missing (named in {DCP_MARKER})") from None
            except Exception as e:  # noqa: BLE001
                raise store_error(e, path, "reading") from None
            with stream:
                yield stream
            return
        self._check_owner(path)
        try:
            raw = client().open(path.path, "wb")
        except Exception as e:  # noqa: BLE001
            raise store_error(e, path, "writing") from None
        hashed = PurePosixPath(path.name).suffix == ".distcp"
        stream = _HashingStream(raw) if hashed else raw
        try:
            yield stream
            stream.close()  # completes the upload: the object appears only now
        except BaseException as e:
            try:
                raw.discard()  # abort the multipart upload: no part of it becomes an object
            except Exception:  # noqa: BLE001
                pass
            raw.closed = True  # so that closing it later (its __del__) never completes a partial upload
            if isinstance(e, CheckpointError):
                raise
            error = getattr(stream, "error", None)  # the store's own error, not torch's "unexpected pos"
            if isinstance(e, Exception):
                raise store_error(error or e, path, "writing") from e
            raise
        if hashed:
            record = {"file": path.name, "size": stream.pos, "algorithm": ALGORITHM, "segments": stream.segments}
            write_object(path.parent / sidecar_path(PurePosixPath(path.name)).name, json.dumps(record).encode(),
                         "checksum sidecar")


class ObjectHashingWriter(HashingWriter):
    """``HashingWriter`` onto ``s3://`` objects: same files and sidecars, no fsync (an upload is durable once done)."""

    def __init__(self, path: ObjectPath | str, **kwargs: Any):
        super().__init__(str(path), sync_files=False, **kwargs)
        self.fs = ObjectFiles()
        self.path = ObjectPath(path)

    def reset(self, checkpoint_id: Any = None) -> None:
        super().reset(None)
        if checkpoint_id:
            self.path = ObjectPath(checkpoint_id)

    @property
    def checkpoint_id(self) -> str:
        return str(self.path)  # DCP stores it in .metadata, which unpickles only plain types


class ObjectReader(VerifyingReader):
    """``VerifyingReader`` of an object-store step: sizes from one listing, items by ranged GETs."""

    def __init__(self, path: ObjectPath | str, checksums: dict[str, Any] | None = None):
        super().__init__(str(path), checksums)
        self.path = ObjectPath(path)
        self.fs = ObjectFiles()
        self._sizes: dict[str, int] | None = None

    def reset(self, checkpoint_id: Any = None) -> None:
        self.storage_data = {}
        if checkpoint_id:
            self.path = ObjectPath(checkpoint_id)
            self._sizes = None
        from torch.distributed.checkpoint.filesystem import _generate_uuid

        self.load_id = _generate_uuid()

    @property
    def checkpoint_id(self) -> str:
        return str(self.path)

    def _file(self, name: str, what: str = "data file") -> Any:
        return _object_name(self.path, name, what)

    def _size_of(self, path: Any, what: str) -> int | None:  # type: ignore[override]
        if self._sizes is None or ObjectPath(path).parent != self.path:
            self._sizes = listing(ObjectPath(path).parent)
        return self._sizes.get(ObjectPath(path).name)

    @staticmethod
    def _read_bytes(path: Any, limit: int, what: str) -> bytes:  # type: ignore[override]
        return read_object(ObjectPath(path), limit, what)

    def read_data(self, plan: Any, planner: Any) -> Any:
        """Read the plan's items in file order, each GET spanning the items that follow it closely."""
        items = sorted(plan.items, key=lambda item: (self.storage_data[item.storage_index].relative_path,
                                                     self.storage_data[item.storage_index].offset))
        self._planned: dict[str, list[tuple[int, int]]] = {}
        for item in items:
            info = self.storage_data[item.storage_index]
            self._planned.setdefault(info.relative_path, []).append((info.offset, info.offset + info.length))
        return super().read_data(dataclasses.replace(plan, items=items), planner)

    def _read_end(self, name: str, lo: int, hi: int) -> int:
        """Read on over the planned items that start within ``GAP`` of the read's end, up to ``SPAN`` bytes."""
        planned = getattr(self, "_planned", {}).get(name, [])
        end = hi
        for start, stop in planned[bisect.bisect_left(planned, (hi, -1)):]:
            if start - end > GAP or stop - lo > SPAN:
                break
            end = max(end, stop)
        return end

    def _slice_file(self, file: Any, sinfo: Any) -> IO[bytes]:
        if self.files.get(sinfo.relative_path) is None:  # unverified: one ranged GET for the item
            self._reading = sinfo
            file.seek(sinfo.offset)
            data = file.read(sinfo.length)
            if len(data) < sinfo.length:
                raise CorruptCheckpointError(f"{self.path / sinfo.relative_path} is corrupt: truncated at byte "
                                             f"{sinfo.offset + len(data)}")
            return io.BytesIO(data)
        return super()._slice_file(file, sinfo)


def object_path(value: str | os.PathLike | ObjectPath) -> ObjectPath | None:
    """``value`` as an ObjectPath if it is an object-store URL, else None."""
    from savepoint.checkpoint.objstore import is_url

    if isinstance(value, ObjectPath):
        return value
    return ObjectPath(value) if isinstance(value, str) and is_url(value) else None
