"""The verifying reader: every byte a load reads is checked against the step's manifest.

:class:`VerifyingReader` checks file sizes before DCP plans, ``.metadata`` before unpickling it,
and every item's segments as DCP reads it, so a load reads each byte once. ``.metadata`` is
unpickled by ``safe_load.RestrictedUnpickler``, which builds only the classes DCP metadata is made
of; non-tensor items are read with ``torch.load(weights_only=True)``. Loading a checkpoint never
runs code from it.
"""

from __future__ import annotations

import bisect
import io
import math
import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.filesystem import FileSystem

from savepoint.checkpoint.hashing import BLOCK, hexdigest
from savepoint.checkpoint.manifest import step_checksums, written_by_savepoint
from savepoint.checkpoint.objstore import ObjectPath
from savepoint.checkpoint.safe_load import safe_unpickle, stored_value_error
from savepoint.durable import DCP_MARKER, MANIFEST
from savepoint.errors import CheckpointError, CorruptCheckpointError
from savepoint.safe_io import inside, open_regular, read_regular, regular_size

METADATA_LIMIT = 1 << 30  # a .metadata without a recorded size is read only up to this


class _StepFiles(FileSystem):
    """DCP's file access for a reader: only regular files inside the step folder, never through a symlink.

    DCP joins each ``relative_path`` of ``.metadata`` to the step folder and opens the result:
    an absolute name or ``..`` would read outside, a FIFO would block the load forever.
    """

    def __init__(self, root: str | os.PathLike):
        super().__init__()
        self.root = Path(root)

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[io.IOBase]:
        if mode != "rb":
            raise CheckpointError(f"refusing to open {path} for writing: a checkpoint is only read here")
        path = Path(path)
        try:
            name = str(path.relative_to(self.root))
        except ValueError:
            raise CorruptCheckpointError(f"{self.root}: refusing to read {path}, which is outside the step folder; "
                                         "nothing outside it was read") from None
        checked = inside(self.root, name, "data file", CorruptCheckpointError)
        try:
            stream = open_regular(checked, "data file", CorruptCheckpointError)
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{checked} is missing (named in {DCP_MARKER})") from None
        with stream:
            yield stream


class VerifyingReader(FileSystemReader):
    """``FileSystemReader`` that checks every byte it reads against the step's manifest.

    It opens only regular files inside the step folder (:class:`_StepFiles`), reads ``.metadata``
    within its recorded size, and before DCP plans anything checks that every item ``.metadata``
    lists lies within its file, that every tensor's shape is backed by the bytes stored for it,
    and (with checksums) that every file it names is listed in the manifest and that reading an
    item never reads much more than the item. A load reads each byte once.

    Args:
        path: the step folder.
        checksums: the manifest's ``checksums`` section; None for checkpoints written without one
            (TorchTitan), which are still unpickled safely and checked structurally, but not verified.
    """

    def __init__(self, path: str | os.PathLike, checksums: dict[str, Any] | None = None):
        super().__init__(path)
        self.fs = _StepFiles(self.path)
        self.checksums = checksums
        self.files: dict[str, Any] = (checksums or {}).get("files", {})
        self._starts = {name: [s[0] for s in entry["segments"]] for name, entry in self.files.items()}
        self._metadata: Any = None
        self._step_rule = False  # for_step: refuse a savepoint-written .metadata without checksums
        self._cached: tuple[str, int, int, bytes] | None = None
        self._items_checked = False

    @classmethod
    def for_step(cls, step_dir: str | os.PathLike, require_checksums: bool = False) -> VerifyingReader:
        """A reader for a step folder, with the checksums :func:`step_checksums` says it must have."""
        if isinstance(step_dir, ObjectPath) and cls is VerifyingReader:
            from savepoint.checkpoint.object_io import ObjectReader

            return ObjectReader.for_step(step_dir, require_checksums)
        reader = cls(step_dir, step_checksums(step_dir, require_checksums))
        reader._step_rule = True
        return reader

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        super().reset(checkpoint_id)
        self.fs.root = Path(self.path)

    @property
    def verified(self) -> bool:
        return self.checksums is not None

    def _file(self, name: str, what: str = "data file") -> Path:
        return inside(self.path, name, what, CorruptCheckpointError)

    # The storage primitives (local files here; objects in ``object_io.ObjectReader``).

    @staticmethod
    def _size_of(path: Path, what: str) -> int | None:
        """The size of a regular file, None when absent; refuses anything but a regular file."""
        return regular_size(path, what, CorruptCheckpointError)

    @staticmethod
    def _read_bytes(path: Path, limit: int, what: str) -> bytes:
        """A whole regular file of at most ``limit`` bytes. Raises FileNotFoundError when absent."""
        return read_regular(path, limit, what, CorruptCheckpointError)

    def check_sizes(self) -> None:
        """Every file the manifest names exists with its size (catches truncation before reading)."""
        for name, entry in self.files.items():
            path = self._file(name)
            size = self._size_of(path, "checkpoint file")
            if size is None:
                raise CorruptCheckpointError(f"{path} is missing (listed in {MANIFEST})")
            if size != entry["size"]:
                raise CorruptCheckpointError(
                    f"{path} is corrupt: {size} bytes, but {entry['size']} were written "
                    f"({'truncated at byte ' + str(size) if size < entry['size'] else 'bytes added after the end'})"
                )

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        if self._metadata is None:
            self._metadata = self._read_metadata(self._get_metadata_path(kwargs.get("rank")))
        metadata = self._metadata
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def _read_metadata(self, path: Path) -> Any:
        if self.verified:
            self.check_sizes()  # a truncated or swapped file is named before anything is read
        path = self._file(path.name, "metadata file")
        entry = self.files.get(path.name)
        if self.verified and entry is None:
            raise CorruptCheckpointError(f"{path.parent / MANIFEST} is corrupt: it has no checksums for "
                                         f"{path.name}, which savepoint always lists")
        try:
            data = self._read_bytes(path, METADATA_LIMIT if entry is None else min(entry["size"], METADATA_LIMIT),
                                    f"DCP {DCP_MARKER}")
        except FileNotFoundError:
            raise CheckpointError(f"{path.parent} has no {path.name}: it is not a complete DCP checkpoint") from None
        if entry is not None:
            _check_bytes(path, entry["segments"], 0, data)
        metadata = safe_unpickle(data, str(path))
        if any(getattr(metadata, name, None) is None for name in ("storage_data", "state_dict_metadata")):
            raise CorruptCheckpointError(f"{path} is corrupt: it unpickles to a {type(metadata).__name__}, "
                                         "not DCP metadata")
        if self._step_rule and not self.verified:
            staging = written_by_savepoint(metadata)
            if staging is not None:
                raise CorruptCheckpointError(
                    f"{path.parent / MANIFEST} is missing, but {path} shows savepoint wrote this step (into "
                    f"{staging}): savepoint writes a manifest with every step, so it was removed or lost and the "
                    "step cannot be verified")
        if self._step_rule:
            self._check_items(path, metadata)
        return metadata

    def check_items(self) -> None:
        """Check ``.metadata``'s records against the files (once; read it first). A step reader
        (:meth:`for_step`) does this as it reads ``.metadata``, every reader before DCP plans a load."""
        path = self._get_metadata_path(None)
        self._check_items(path, self.read_metadata())

    def _check_items(self, path: Path, metadata: Any) -> None:
        if self._items_checked:
            return
        try:
            self._check_items_now(path, metadata)
        except (AttributeError, TypeError, ValueError) as e:
            raise CorruptCheckpointError(f"{path} is corrupt: its records of stored items are malformed "
                                         f"({type(e).__name__}: {e})") from None
        self._items_checked = True

    def _check_items_now(self, path: Path, metadata: Any) -> None:
        """Each item within its file (a regular file in the step), each tensor's shape backed by stored bytes."""
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

        storage = metadata.storage_data
        if not isinstance(storage, dict):
            raise CorruptCheckpointError(f"{path} is corrupt: its storage records are a {type(storage).__name__}")
        sizes: dict[str, int] = {}
        stored: dict[tuple[str, tuple[int, ...] | None], Any] = {}
        for index, info in storage.items():
            name, offset, length = info.relative_path, info.offset, info.length
            size = sizes.get(name)
            if size is None:
                size = sizes[name] = self._data_file_size(path, name)
            if type(offset) is not int or type(length) is not int or offset < 0 or length < 0 or \
                    offset + length > size:
                raise CorruptCheckpointError(
                    f"{self._file(name)} is corrupt: {path.name} places {index.fqn!r} at bytes "
                    f"[{offset}, {offset + length if type(offset) is type(length) is int else '?'}) but the file "
                    f"has {size}")
            if name in self.files:
                self._check_read_span(name, index.fqn, offset, length)
            stored[(index.fqn, None if index.offset is None else tuple(index.offset))] = info
        for fqn, meta in metadata.state_dict_metadata.items():
            if isinstance(meta, TensorStorageMetadata):
                self._check_tensor(path, fqn, meta, stored)
            elif not isinstance(meta, BytesStorageMetadata):
                raise CorruptCheckpointError(f"{path} is corrupt: {fqn!r} is a {type(meta).__name__}, neither a "
                                             "tensor nor a stored value")

    def _data_file_size(self, path: Path, name: Any) -> int:
        if not isinstance(name, str):
            raise CorruptCheckpointError(f"{path} is corrupt: it names a data file {name!r}, not a file name")
        file = self._file(name)  # refuses absolute names, '..' and symlinks on the way
        size = self._size_of(file, "data file")  # refuses a symlink, FIFO, device, folder
        if size is None:
            raise CorruptCheckpointError(f"{file} is missing ({path.name} places items in it)")
        if self.verified and name not in self.files:
            raise CorruptCheckpointError(f"{file} is not listed in {MANIFEST}, so its bytes have no checksums: "
                                         "the step was altered after it was saved")
        return size

    def _check_read_span(self, name: str, fqn: str, offset: int, length: int) -> None:
        """Reading an item reads its covering segments: at most two blocks more than the item itself."""
        if length == 0:
            return
        lo, hi = self._covering(name, offset, offset + length)
        if hi - lo > length + 2 * BLOCK:
            raise CorruptCheckpointError(
                f"{self._file(name)} is corrupt: {MANIFEST}'s segments for it do not line up with the items "
                f"{DCP_MARKER} places in it (reading {fqn!r}, {length} bytes, would read {hi - lo})")

    def _covering(self, name: str, start: int, end: int) -> tuple[int, int]:
        """[lo, hi): the segments of ``name`` that cover bytes [start, end) (segments tile the file)."""
        starts = self._starts[name]
        segments = self.files[name]["segments"]
        first = bisect.bisect_right(starts, start) - 1
        last = bisect.bisect_left(starts, end) - 1
        return segments[first][0], segments[last][1]

    @staticmethod
    def _check_tensor(path: Path, fqn: str, meta: Any, stored: dict) -> None:
        """The shape, each chunk's place in it and each chunk's bytes agree: no shape outgrows the bytes stored."""
        import torch

        shape = tuple(meta.size)
        dtype = meta.properties.dtype
        if not isinstance(dtype, torch.dtype) or any(type(d) is not int or d < 0 for d in shape):
            raise CorruptCheckpointError(f"{path} is corrupt: tensor {fqn!r} has shape {list(shape)} and dtype "
                                         f"{dtype!r}")
        held = 0
        for chunk in meta.chunks:
            offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
            if len(offsets) != len(shape) or len(sizes) != len(shape) or \
                    any(type(o) is not int or type(n) is not int or o < 0 or n < 0 or o + n > d
                        for o, n, d in zip(offsets, sizes, shape, strict=True)):
                raise CorruptCheckpointError(f"{path} is corrupt: tensor {fqn!r} of shape {list(shape)} has a chunk "
                                             f"of shape {list(sizes)} at {list(offsets)}, outside it")
            info = stored.get((fqn, offsets))
            if info is None:
                raise CorruptCheckpointError(f"{path} is corrupt: no stored bytes for the chunk at {list(offsets)} "
                                             f"of tensor {fqn!r}")
            elements = math.prod(sizes)
            if not info.transform_descriptors and elements * dtype.itemsize > info.length:
                raise CorruptCheckpointError(
                    f"{path} is corrupt: tensor {fqn!r} has shape {list(shape)}, but the chunk of shape "
                    f"{list(sizes)} at {list(offsets)} would need {elements * dtype.itemsize:,} bytes and "
                    f"{info.length:,} are stored")
            held += elements
        if math.prod(shape) > held:
            raise CorruptCheckpointError(f"{path} is corrupt: tensor {fqn!r} has shape {list(shape)} "
                                         f"({math.prod(shape):,} elements) but its chunks hold {held:,}")

    def set_up_storage_reader(self, metadata: Any, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)
        self.check_sizes()
        self._check_items(self._get_metadata_path(self.rank), metadata)

    def read_data(self, plan: Any, planner: Any) -> Any:
        try:
            return super().read_data(plan, planner)
        except pickle.UnpicklingError as e:  # torch.load(weights_only=True) refused a stored tensor's pickle
            sinfo = getattr(self, "_reading", None)
            fqn = next((index.fqn for index, info in self.storage_data.items() if info is sinfo), "?")
            raise stored_value_error(e, fqn, str(self._file(sinfo.relative_path)) if sinfo else None) from None
        finally:
            self._cached = None

    def _slice_file(self, file: Any, sinfo: Any) -> IO[bytes]:
        self._reading = sinfo  # the item being read, for read_data's message
        name = sinfo.relative_path
        entry = self.files.get(name)
        if entry is None:
            if self.verified:  # _check_items refused such a .metadata already; never read unchecked bytes
                raise CorruptCheckpointError(f"{self._file(name)} is not listed in {MANIFEST}")
            return super()._slice_file(file, sinfo)
        start, end = sinfo.offset, sinfo.offset + sinfo.length
        if start == end:
            return io.BytesIO(b"")
        lo, hi = self._covering(name, start, end)
        cached = self._cached
        if cached is not None and cached[0] == name and cached[1] <= lo and hi <= cached[2]:
            base, data = cached[1], cached[3]  # coarse segments: the range was read and checked for an item before
        else:
            hi = self._covering(name, lo, self._read_end(name, lo, hi))[1]
            file.seek(lo)
            data = file.read(hi - lo)
            path = self.path / name
            if len(data) < hi - lo:
                raise CorruptCheckpointError(f"{path} is corrupt: truncated at byte {lo + len(data)}")
            first = bisect.bisect_right(self._starts[name], lo) - 1
            last = bisect.bisect_left(self._starts[name], hi)
            _check_bytes(path, entry["segments"][first:last], lo, data)
            base = lo
            # Segments as the writer cuts them are the items themselves; keep a coarser range for the next item.
            self._cached = (name, lo, hi, data) if hi - lo > end - start else None
        return io.BytesIO(memoryview(data)[start - base:end - base])

    def _read_end(self, name: str, lo: int, hi: int) -> int:
        """Where one read starting at ``lo`` for an item ending at ``hi`` stops: at ``hi`` for a local file
        (an object store's reader reads on over the next items, see ``object_io.ObjectReader``)."""
        return hi


def _check_bytes(path: Path, segments: list[list[Any]], base: int, data: bytes) -> None:
    """Check ``segments`` (all within ``data``, which starts at file offset ``base``)."""
    view = memoryview(data)
    for seg_start, seg_end, digest in segments:
        if hexdigest(view[seg_start - base:seg_end - base]) != digest:
            raise CorruptCheckpointError(
                f"{path} is corrupt: bytes [{seg_start}, {seg_end}) do not match the checksum written with them"
            )

