"""Checksums written with every step, checked by ``savepoint verify`` and on every load; safe unpickling.

Writing: DCP writes each ``.distcp`` through :class:`HashingFileSystem`, whose stream hashes the
bytes while they are written (on a second thread, so hashing overlaps the write system call). DCP
asks the stream for its position before and after every item, so the stream cuts a new *segment*
there: segments line up with the stored items. Each finished file leaves a hidden sidecar with its
size and segment hashes; at commit rank 0 folds the sidecars into ``manifest.json`` and hashes the
files no writer hashed (``.metadata``, a Hugging Face export's files) in fixed blocks.

The manifest checks itself: ``manifest_checksum`` is the hash of the file's own bytes with that
value blanked, so a flipped bit anywhere in it is caught too.

Reading: :class:`VerifyingReader` checks file sizes before DCP plans, ``.metadata`` before
unpickling it, and every item's segments as DCP reads it, so a load reads each byte once.
``.metadata`` is unpickled by ``safe_load.RestrictedUnpickler``, which builds only the classes DCP
metadata is made of; non-tensor items are read with ``torch.load(weights_only=True)``. Loading a
checkpoint never runs code from it.
"""

from __future__ import annotations

import bisect
import io
import json
import math
import os
import pickle
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import xxhash
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

from savepoint.checkpoint.safe_load import safe_unpickle, stored_value_error
from savepoint.errors import CheckpointError, CorruptCheckpointError
from savepoint.safe_io import inside, open_regular, read_regular, regular_size

ALGORITHM = "xxh3_128"
SIDECAR_SUFFIX = ".sums.json"
BLOCK = 64 << 20  # segment size for files hashed after the fact
OVERLAP_MIN = 1 << 20  # writes at least this big are hashed on the helper thread
MANIFEST = "manifest.json"
SELF_KEY = "manifest_checksum"
_BLANK = "0" * 32
MANIFEST_LIMIT = 256 << 20  # a manifest is ~120 bytes per stored item: 256 MiB is ~2 million items
METADATA_LIMIT = 1 << 30  # a .metadata without a recorded size is read only up to this
MAX_DEPTH = 32  # a manifest nests 6 levels


def _hexdigest(data: Any) -> str:
    return xxhash.xxh3_128(data).hexdigest()


# ---- writing -----------------------------------------------------------------------------------


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
            segments.append([start, start + len(data), _hexdigest(data)])
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


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The manifest as written: JSON whose ``manifest_checksum`` is the hash of these bytes with it blanked."""
    body = {**manifest, SELF_KEY: _BLANK}
    blank = (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()
    digest = _hexdigest(blank)
    return blank.replace(_self_field(_BLANK), _self_field(digest), 1)


def _self_field(value: str) -> bytes:
    return f'"{SELF_KEY}": "{value}"'.encode()


def read_manifest(step_dir: Path) -> dict[str, Any] | None:
    """The step's manifest, read within bounds, its own checksum and its schema checked; None when absent.

    The only reader of ``manifest.json``. It reads at most :data:`MANIFEST_LIMIT` bytes from a
    regular file (not a symlink, FIFO or folder), refuses nesting deeper than :data:`MAX_DEPTH`
    before parsing (``json`` parses recursively), and checks every field a reader uses
    (:func:`check_manifest`), so callers can index it without guarding against a crafted one.

    Raises:
        CorruptCheckpointError: something is at ``manifest.json`` but it is not a sound manifest.
    """
    path = Path(step_dir) / MANIFEST
    try:
        raw = read_regular(path, MANIFEST_LIMIT, "manifest", CorruptCheckpointError)
    except FileNotFoundError:
        return None
    if not _nesting_within(raw, MAX_DEPTH):
        raise CorruptCheckpointError(f"{path} is corrupt: its JSON is nested more than {MAX_DEPTH} levels deep "
                                     "(or its brackets do not balance); a manifest is a few levels deep")
    try:
        manifest = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CorruptCheckpointError(f"{path} is corrupt: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise CorruptCheckpointError(f"{path} is corrupt: not valid JSON (not a JSON object)")
    stored = manifest.get(SELF_KEY)
    if stored is not None and (not isinstance(stored, str) or raw.count(_self_field(stored)) != 1 or
                               _hexdigest(raw.replace(_self_field(stored), _self_field(_BLANK), 1)) != stored):
        raise CorruptCheckpointError(f"{path} is corrupt: its bytes do not match its {SELF_KEY}")
    check_manifest(manifest, path)  # also for manifests written before they checked themselves
    return manifest


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*+"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def _nesting_within(raw: bytes, depth: int) -> bool:
    """Whether the JSON text's brackets balance within ``depth`` levels (a few C-level passes, no parse)."""
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    for _ in range(depth):
        if not brackets:
            return True
        shorter = brackets.replace(b"[]", b"").replace(b"{}", b"")
        if len(shorter) == len(brackets):
            return False  # unbalanced: json.loads would say where
        brackets = shorter
    return not brackets


class _Schema:
    """Type checks for one manifest: each failure names the field, as ``checksums.files['x'].size``."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, where: str, problem: str) -> None:
        raise CorruptCheckpointError(f"{self.path} is corrupt: {where} {problem}")

    def mapping(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(where, f"is {_json_type(value)}, not an object (mapping)")
        return value

    def integer(self, value: Any, where: str, minimum: int = 0) -> int:
        if type(value) is not int or value < minimum:
            self.fail(where, f"is {value!r}, not an integer >= {minimum}" if _short(value) else
                      f"is {_json_type(value)}, not an integer >= {minimum}")
        return value

    def text(self, value: Any, where: str, optional: bool = False) -> None:
        if not isinstance(value, str) and not (optional and value is None):
            self.fail(where, f"is {_json_type(value)}, not a string")

    def name(self, value: str, where: str) -> None:
        if not value or "/" in value or "\0" in value or value in (".", ".."):
            self.fail(where, f"names {value!r}, which is not a file of the step folder (a manifest names only "
                             "the plain file names of its own step); nothing outside the step was read")


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _short(value: Any) -> bool:
    return isinstance(value, (int, float, bool)) or value is None


def check_manifest(manifest: dict[str, Any], path: Path) -> None:
    """Every field readers use has its type: ``checksums.files`` maps plain file names to
    ``{"size": int >= 0, "segments": [[start, end, hex], ...]}`` whose segments cover the file in
    order, without gaps or overlaps; ``files`` maps names to sizes; ``kind``, ``layout`` and the
    ``job_config`` sections have the shapes savepoint writes.

    Raises:
        CorruptCheckpointError: naming the first field that is wrong.
    """
    s = _Schema(path)
    for key in ("format", "kind", "torch_version"):
        if key in manifest:
            s.text(manifest[key], key)
    if "export_dtype" in manifest:
        s.text(manifest["export_dtype"], "export_dtype", optional=True)
    if "step" in manifest:
        s.integer(manifest["step"], "step")
    if "world_size" in manifest:
        s.integer(manifest["world_size"], "world_size", minimum=1)
    if "created_unix" in manifest and type(manifest["created_unix"]) not in (int, float):
        s.fail("created_unix", f"is {_json_type(manifest['created_unix'])}, not a number")
    if "layout" in manifest:
        layout = s.mapping(manifest["layout"], "layout")
        for key, value in layout.items():
            s.integer(value, f"layout.{key}", minimum=1)
        if layout and "world_size" not in layout:
            s.fail("layout", "has no world_size")
    if "files" in manifest:
        for name, size in s.mapping(manifest["files"], "files").items():
            s.name(name, f"files[{name!r}]")
            s.integer(size, f"files[{name!r}]")
    if "job_config" in manifest:
        for section, values in s.mapping(manifest["job_config"], "job_config").items():
            s.mapping(values, f"job_config.{section}")
        flavor = manifest["job_config"].get("model", {}).get("flavor")
        s.text(flavor, "job_config.model.flavor", optional=True)
    if "checksums" in manifest:
        checksums = s.mapping(manifest["checksums"], "checksums")
        if checksums.get("algorithm") != ALGORITHM:
            s.fail("checksums.algorithm", f"is {checksums.get('algorithm')!r}; this savepoint checks {ALGORITHM!r}")
        for name, entry in s.mapping(checksums.get("files"), "checksums.files").items():
            where = f"checksums.files[{name!r}]"
            s.name(name, where)
            entry = s.mapping(entry, where)
            size = s.integer(entry.get("size"), f"{where}.size")
            segments = entry.get("segments")
            if not isinstance(segments, list):
                s.fail(f"{where}.segments", f"is {_json_type(segments)}, not a list")
            _check_segments(s, segments, size, f"{where}.segments")


def _check_segments(s: _Schema, segments: list[Any], size: int, where: str) -> None:
    """Segments are ``[start, end, digest]`` and tile ``[0, size)`` in order: none overlaps, repeats or is missing."""
    end = 0
    for i, seg in enumerate(segments):
        if type(seg) is not list or len(seg) != 3 or type(seg[0]) is not int or type(seg[1]) is not int or \
                type(seg[2]) is not str or len(seg[2]) != 32:
            s.fail(f"{where}[{i}]", f"is {_json_type(seg)}, not [start, end, 32-digit hash]" if not _short(seg)
                   else f"is {seg!r}, not [start, end, 32-digit hash]")
        if seg[0] != end or seg[1] <= seg[0]:
            s.fail(f"{where}[{i}]", f"is bytes [{seg[0]}, {seg[1]}) but the segment before it ends at byte {end}: "
                   "segments must cover the file in order, each once, without gaps or overlaps")
        end = seg[1]
    if end != size:
        s.fail(where, f"cover bytes [0, {end}) of a {size}-byte file: segments must cover all of it, and no more")


# ---- which steps must have checksums ------------------------------------------------------------

_STEP_RE = re.compile(r"^step-\d+$")
_STAGING_RE = re.compile(r"^\.step-\d+\.partial$")  # where savepoint writes a step before committing it


def step_checksums(step_dir: str | os.PathLike, require: bool = False) -> dict[str, Any] | None:
    """The checksums a step must be loaded with, by the one rule for steps without them.

    The rule (load, ``verify``, ``inspect`` and the converters all go through here):

    1. A ``step-N`` folder that is a symlink is refused: a committed step is a folder of its own.
    2. If anything is at ``manifest.json``, it must be a sound manifest *with* ``checksums``:
       savepoint writes them with every step, so a manifest without them was tampered with.
    3. Without a manifest, the step counts as corrupt when savepoint evidently wrote it: another
       ``step-M`` in the same folder has a manifest, or (checked once ``.metadata`` is read, see
       :meth:`VerifyingReader.read_metadata`) its ``.metadata`` was written into savepoint's
       staging folder ``.step-N.partial``.
    4. Otherwise (a folder that never had manifests: TorchTitan's) it loads unverified, and only
       with ``require`` (``--checkpoint.require_checksums``) is that an error.

    Returns:
        the manifest's ``checksums``, or None for an unverified step (rule 4).

    Raises:
        CorruptCheckpointError: rules 1-3.
        CheckpointError: rule 4 with ``require``.
    """
    step_dir = Path(step_dir)
    if _STEP_RE.match(step_dir.name) and step_dir.is_symlink():
        raise CorruptCheckpointError(
            f"{step_dir} is a symbolic link (to {os.readlink(step_dir)}): a committed step is a folder inside "
            "its checkpoint folder, so the link was not followed; replace it with the step folder itself")
    manifest = read_manifest(step_dir)
    if manifest is not None:
        checksums = manifest.get("checksums")
        if checksums is None:
            raise CorruptCheckpointError(
                f"{step_dir / MANIFEST} is corrupt: it has no checksums, which savepoint writes into every "
                "manifest, so they were removed and the step cannot be verified")
        return checksums
    sibling = _sibling_with_manifest(step_dir)
    if sibling is not None:
        raise CorruptCheckpointError(
            f"{step_dir / MANIFEST} is missing, but {sibling.name} in the same folder has one: savepoint writes a "
            "manifest with every step, so this one was removed or lost and the step cannot be verified")
    if require:
        raise CheckpointError(
            f"{step_dir} has no checksums (no {MANIFEST}: written by TorchTitan, not savepoint) and "
            "--checkpoint.require_checksums is set; drop that flag to load it unverified, or verify the files "
            "another way")
    return None


def _sibling_with_manifest(step_dir: Path) -> Path | None:
    try:
        entries = list(os.scandir(step_dir.parent))
    except OSError:
        return None
    for entry in sorted(entries, key=lambda e: e.name):
        if entry.name != step_dir.name and _STEP_RE.match(entry.name) and \
                os.path.lexists(os.path.join(entry.path, MANIFEST)):
            return Path(entry.path)
    return None


def written_by_savepoint(metadata: Any) -> str | None:
    """Where ``.metadata`` shows savepoint wrote it (its staging folder's name), else None."""
    checkpoint_id = getattr(getattr(metadata, "storage_meta", None), "checkpoint_id", None)
    if isinstance(checkpoint_id, (str, os.PathLike)):
        name = os.path.basename(os.fspath(checkpoint_id))
        if isinstance(name, str) and _STAGING_RE.match(name):
            return name
    return None


# ---- reading -----------------------------------------------------------------------------------


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
            raise CorruptCheckpointError(f"{checked} is missing (named in .metadata)") from None
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

    def check_sizes(self) -> None:
        """Every file the manifest names exists with its size (catches truncation before reading)."""
        for name, entry in self.files.items():
            path = self._file(name)
            size = regular_size(path, "checkpoint file", CorruptCheckpointError)
            if size is None:
                raise CorruptCheckpointError(f"{path} is missing (listed in {MANIFEST})")
            if size != entry["size"]:
                raise CorruptCheckpointError(
                    f"{path} is corrupt: {size} bytes, but {entry['size']} were written "
                    f"({'truncated at byte ' + str(size) if size < entry['size'] else 'bytes added after the end'})"
                )

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        if self._metadata is None:
            self._metadata = self._read_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
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
            data = read_regular(path, METADATA_LIMIT if entry is None else min(entry["size"], METADATA_LIMIT),
                                "DCP .metadata", CorruptCheckpointError)
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
        path = Path(self._get_metadata_path(None))
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
        size = regular_size(file, "data file", CorruptCheckpointError)  # refuses a symlink, FIFO, device, folder
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
                f".metadata places in it (reading {fqn!r}, {length} bytes, would read {hi - lo})")

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
        self._check_items(Path(self._get_metadata_path(self.rank)), metadata)

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
            file.seek(lo)
            data = file.read(hi - lo)
            path = Path(self.path) / name
            if len(data) < hi - lo:
                raise CorruptCheckpointError(f"{path} is corrupt: truncated at byte {lo + len(data)}")
            first = bisect.bisect_right(self._starts[name], start) - 1
            last = bisect.bisect_left(self._starts[name], end)
            _check_bytes(path, entry["segments"][first:last], lo, data)
            base = lo
            # Segments as the writer cuts them are the items themselves; keep a coarser range for the next item.
            self._cached = (name, lo, hi, data) if hi - lo > end - start else None
        return io.BytesIO(memoryview(data)[start - base:end - base])


def _check_bytes(path: Path, segments: list[list[Any]], base: int, data: bytes) -> None:
    """Check ``segments`` (all within ``data``, which starts at file offset ``base``)."""
    view = memoryview(data)
    for seg_start, seg_end, digest in segments:
        if _hexdigest(view[seg_start - base:seg_end - base]) != digest:
            raise CorruptCheckpointError(
                f"{path} is corrupt: bytes [{seg_start}, {seg_end}) do not match the checksum written with them"
            )


# ---- verify ------------------------------------------------------------------------------------


@dataclass
class Report:
    """What ``verify_step`` found. ``ok`` is False only for damage; ``notes`` are informational."""

    step_dir: Path
    ok: bool = True
    verified: bool = False  # checksums were there and checked (False: structure only)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked_bytes: int = 0

    def fail(self, problem: str) -> None:
        self.ok = False
        self.problems.append(problem)


def verify_step(step_dir: str | os.PathLike) -> Report:
    """Check every file of a step folder against its manifest, then that ``.metadata`` loads safely.

    Which steps must have checksums is :func:`step_checksums`' rule, as for loading. A step
    without them (TorchTitan's) gets the structural check only: its metadata unpickles safely,
    every item it lists lies within a regular file of the step, and every tensor's shape is backed
    by the bytes stored for it.
    """
    step_dir = Path(step_dir)
    report = Report(step_dir)
    if not step_dir.is_dir():
        report.fail(f"{step_dir} is not a folder")
        return report
    try:
        reader = VerifyingReader.for_step(step_dir)
    except CheckpointError as e:
        report.fail(str(e))
        return report
    files = reader.files
    if not reader.verified:
        report.notes.append("no checksums in this step (written by TorchTitan; no step beside it has a "
                            f"{MANIFEST}): checked its structure only")
    for name, entry in sorted(files.items(), key=lambda kv: (kv[0] != ".metadata", kv[0])):
        _verify_file(step_dir, name, entry, report)
    listed = set(files) | {MANIFEST}
    for path in sorted(step_dir.iterdir()):
        if reader.verified and path.name not in listed:
            report.notes.append(f"{path.name} is not listed in {MANIFEST} (added after the save?)")
    if report.ok:
        report.verified = reader.verified
        if os.path.lexists(step_dir / ".metadata"):
            try:
                reader.read_metadata()
            except CheckpointError as e:
                report.fail(str(e))
        elif not files and not (step_dir / "model.safetensors.index.json").is_file():
            report.fail(f"{step_dir} holds neither DCP .metadata nor a Hugging Face index: not a checkpoint step")
    return report


def _verify_file(step_dir: Path, name: str, entry: dict[str, Any], report: Report) -> None:
    try:
        path = inside(step_dir, name, "file", CorruptCheckpointError)
        size = regular_size(path, "checkpoint file", CorruptCheckpointError)
        if size is None:
            report.fail(f"{path} is missing (listed in {MANIFEST})")
            return
        if size != entry["size"]:
            where = f"truncated at byte {size}" if size < entry["size"] else f"bytes added after byte {entry['size']}"
            report.fail(f"{path} is corrupt: {size} bytes, {entry['size']} were written ({where})")
            return
        with open_regular(path, "checkpoint file", CorruptCheckpointError) as f:
            buffer = bytearray(min(BLOCK, size))
            view = memoryview(buffer)
            for seg_start, seg_end, digest in entry["segments"]:  # they tile the file: read in order, once
                hasher = xxhash.xxh3_128()
                left = seg_end - seg_start
                while left:
                    got = f.readinto(view[:min(left, len(buffer))])
                    if not got:
                        report.fail(f"{path} is corrupt: truncated at byte {seg_end - left}")
                        return
                    hasher.update(view[:got])
                    left -= got
                report.checked_bytes += seg_end - seg_start
                if hasher.hexdigest() != digest:
                    report.fail(f"{path} is corrupt: bytes [{seg_start}, {seg_end}) do not match their checksum")
                    return
    except CheckpointError as e:
        report.fail(str(e))


def step_dirs(path: str | os.PathLike) -> list[Path]:
    """The step folders under a checkpoint folder (committed names only), or ``[path]`` for a step folder."""
    path = Path(path)
    if os.path.lexists(path / MANIFEST) or os.path.lexists(path / ".metadata") or _STEP_RE.match(path.name):
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder; give a checkpoint folder or one of its step-N folders")
    steps = [(int(p.name[5:]), p) for p in path.iterdir() if _STEP_RE.match(p.name) and p.is_dir()]
    return [p for _, p in sorted(steps)]
