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

import io
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import xxhash
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

from savepoint.checkpoint.safe_load import safe_unpickle
from savepoint.errors import CheckpointError, CorruptCheckpointError

ALGORITHM = "xxh3_128"
SIDECAR_SUFFIX = ".sums.json"
BLOCK = 64 << 20  # segment size for files hashed after the fact
OVERLAP_MIN = 1 << 20  # writes at least this big are hashed on the helper thread
MANIFEST = "manifest.json"
SELF_KEY = "manifest_checksum"
_BLANK = "0" * 32


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
    """The step's manifest after checking its own checksum; None when there is no manifest.

    Raises:
        CorruptCheckpointError: the manifest is not valid JSON or its bytes changed.
    """
    path = Path(step_dir) / MANIFEST
    if not path.is_file():
        return None
    raw = path.read_bytes()
    try:
        manifest = json.loads(raw)
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"{path} is corrupt: not valid JSON ({e})") from None
    stored = manifest.get(SELF_KEY)
    if stored is None:
        return manifest  # written before manifests checked themselves
    if not isinstance(stored, str) or raw.count(_self_field(stored)) != 1 or \
            _hexdigest(raw.replace(_self_field(stored), _self_field(_BLANK), 1)) != stored:
        raise CorruptCheckpointError(f"{path} is corrupt: its bytes do not match its {SELF_KEY}")
    return manifest


# ---- reading -----------------------------------------------------------------------------------


class VerifyingReader(FileSystemReader):
    """``FileSystemReader`` that checks every byte it reads against the step's manifest.

    Args:
        path: the step folder.
        checksums: the manifest's ``checksums`` section; None for checkpoints written without one
            (TorchTitan, older savepoint), which are still unpickled safely but not verified.
    """

    def __init__(self, path: str | os.PathLike, checksums: dict[str, Any] | None = None):
        super().__init__(path)
        self.files: dict[str, Any] = (checksums or {}).get("files", {})
        self._metadata: Any = None

    @classmethod
    def for_step(cls, step_dir: str | os.PathLike) -> VerifyingReader:
        """A reader for a step folder, with its manifest's checksums if it has them (manifest checked first)."""
        manifest = read_manifest(Path(step_dir))
        return cls(step_dir, (manifest or {}).get("checksums"))

    @property
    def verified(self) -> bool:
        return bool(self.files)

    def check_sizes(self) -> None:
        """Every file the manifest names exists with its size (catches truncation before reading), and
        so does every file ``.metadata`` names (a step committed without some rank's shards)."""
        for name in sorted({info.relative_path for info in getattr(self._metadata, "storage_data", {}).values()}):
            if name not in self.files and not (Path(self.path) / name).is_file():
                raise CorruptCheckpointError(f"{Path(self.path) / name} is missing (named in .metadata)")
        for name, entry in self.files.items():
            path = Path(self.path) / name
            size = path.stat().st_size if path.is_file() else None
            if size is None:
                raise CorruptCheckpointError(f"{path} is missing (listed in {MANIFEST})")
            if size != entry["size"]:
                raise CorruptCheckpointError(
                    f"{path} is corrupt: {size} bytes, but {entry['size']} were written "
                    f"({'truncated at byte ' + str(size) if size < entry['size'] else 'bytes added after the end'})"
                )

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        if self._metadata is None:
            path = Path(self._get_metadata_path(kwargs.get("rank")))
            if not path.is_file():
                raise CheckpointError(f"{path.parent} has no {path.name}: it is not a complete DCP checkpoint")
            data = path.read_bytes()
            entry = self.files.get(path.name)
            if entry is not None:
                _check_bytes(path, entry, 0, data)
            metadata = safe_unpickle(data, str(path))
            if any(getattr(metadata, name, None) is None for name in ("storage_data", "state_dict_metadata")):
                raise CorruptCheckpointError(f"{path} is corrupt: it unpickles to a {type(metadata).__name__}, "
                                             "not DCP metadata")
            self._metadata = metadata
        metadata = self._metadata
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def set_up_storage_reader(self, metadata: Any, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)
        self.check_sizes()

    def _slice_file(self, file: Any, sinfo: Any) -> IO[bytes]:
        entry = self.files.get(sinfo.relative_path)
        if entry is None:
            return super()._slice_file(file, sinfo)
        start, end = sinfo.offset, sinfo.offset + sinfo.length
        covering = [s for s in entry["segments"] if s[0] < end and s[1] > start]
        lo = min((s[0] for s in covering), default=start)
        hi = max((s[1] for s in covering), default=end)
        file.seek(lo)
        data = file.read(hi - lo)
        path = Path(self.path) / sinfo.relative_path
        if len(data) < hi - lo:
            raise CorruptCheckpointError(f"{path} is corrupt: truncated at byte {lo + len(data)}")
        _check_bytes(path, {"segments": covering}, lo, data)
        return io.BytesIO(memoryview(data)[start - lo:end - lo])


def _check_bytes(path: Path, entry: dict[str, Any], base: int, data: bytes) -> None:
    """Check the segments of ``entry`` that lie within ``data`` (which starts at file offset ``base``)."""
    view = memoryview(data)
    for seg_start, seg_end, digest in entry["segments"]:
        if seg_start < base or seg_end > base + len(data):
            continue
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

    A step without checksums (TorchTitan, older savepoint) gets the structural check only: its
    metadata unpickles safely and every item it lists lies within an existing file.
    """
    step_dir = Path(step_dir)
    report = Report(step_dir)
    if not step_dir.is_dir():
        report.fail(f"{step_dir} is not a folder")
        return report
    try:
        manifest = read_manifest(step_dir)
    except CorruptCheckpointError as e:
        report.fail(str(e))
        manifest = None
    checksums = (manifest or {}).get("checksums")
    files = (checksums or {}).get("files", {})
    if report.ok and not files:
        is_dcp = (step_dir / ".metadata").is_file()
        report.notes.append("no checksums in this step (written by TorchTitan or an older savepoint): "
                            "checked its structure only" if is_dcp or manifest is None else
                            "no checksums in this step's manifest: checked its structure only")
    for name, entry in sorted(files.items(), key=lambda kv: (kv[0] != ".metadata", kv[0])):
        _verify_file(step_dir / name, entry, report)
    listed = set(files) | {MANIFEST}
    for path in sorted(step_dir.iterdir()):
        if files and path.name not in listed:
            report.notes.append(f"{path.name} is not listed in {MANIFEST} (added after the save?)")
    if report.ok:
        report.verified = bool(files)
        if (step_dir / ".metadata").is_file():
            _check_structure(step_dir, report)
        elif not files and not (step_dir / "model.safetensors.index.json").is_file():
            report.fail(f"{step_dir} holds neither DCP .metadata nor a Hugging Face index: not a checkpoint step")
    return report


def _verify_file(path: Path, entry: dict[str, Any], report: Report) -> None:
    if not path.is_file():
        report.fail(f"{path} is missing (listed in {MANIFEST})")
        return
    size = path.stat().st_size
    if size != entry["size"]:
        where = f"truncated at byte {size}" if size < entry["size"] else f"bytes added after byte {entry['size']}"
        report.fail(f"{path} is corrupt: {size} bytes, {entry['size']} were written ({where})")
        return
    with open(path, "rb") as f:
        for seg_start, seg_end, digest in entry["segments"]:
            f.seek(seg_start)
            data = f.read(seg_end - seg_start)
            report.checked_bytes += len(data)
            if _hexdigest(data) != digest:
                report.fail(f"{path} is corrupt: bytes [{seg_start}, {seg_end}) do not match their checksum")
                return


def _check_structure(step_dir: Path, report: Report) -> None:
    try:
        metadata = VerifyingReader(step_dir).read_metadata()
    except CheckpointError as e:
        report.fail(str(e))
        return
    sizes: dict[str, int] = {}
    for info in metadata.storage_data.values():
        name = info.relative_path
        if name not in sizes:
            path = step_dir / name
            sizes[name] = path.stat().st_size if path.is_file() else -1
        if sizes[name] < 0:
            report.fail(f"{step_dir / name} is missing (named in .metadata)")
            return
        if info.offset + info.length > sizes[name]:
            report.fail(f"{step_dir / name} is corrupt: .metadata places an item at bytes "
                        f"[{info.offset}, {info.offset + info.length}) but the file has {sizes[name]}")
            return


def step_dirs(path: str | os.PathLike) -> list[Path]:
    """The step folders under a checkpoint folder (committed names only), or ``[path]`` for a step folder."""
    from savepoint.checkpoint.storage import STEP_DIR_RE

    path = Path(path)
    if (path / MANIFEST).is_file() or (path / ".metadata").is_file() or STEP_DIR_RE.match(path.name):
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder; give a checkpoint folder or one of its step-N folders")
    steps = [(int(m.group(1)), p) for p in path.iterdir() if (m := STEP_DIR_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(steps)]
