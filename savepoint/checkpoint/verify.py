"""``savepoint verify``: every file of a step read once and checked against its manifest.

:func:`verify_step` reports damage instead of raising, so a folder's steps are all checked and
listed; :func:`step_dirs` picks the step folders of a checkpoint folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from savepoint.checkpoint.hashing import BLOCK
from savepoint.checkpoint.manifest import STEP_RE
from savepoint.checkpoint.object_folder import listing
from savepoint.checkpoint.objstore import ObjectPath, client, is_url, store_error
from savepoint.checkpoint.reader import VerifyingReader
from savepoint.durable import DCP_MARKER, HF_INDEX, MANIFEST
from savepoint.errors import CheckpointError, CorruptCheckpointError
from savepoint.safe_io import inside, open_regular, regular_size


@dataclass
class Report:
    """What ``verify_step`` found. ``ok`` is False only for damage; ``notes`` are informational."""

    step_dir: Any  # a Path, or an ObjectPath on an object store
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
    step_dir = step_dir if isinstance(step_dir, ObjectPath) else Path(step_dir)
    report = Report(step_dir)
    remote = isinstance(step_dir, ObjectPath)
    sizes = listing(step_dir) if remote else {}
    if remote and not sizes:
        report.fail(f"{step_dir} holds no objects: not a checkpoint step")
        return report
    if not remote and not step_dir.is_dir():
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
    for name, entry in sorted(files.items(), key=lambda kv: (kv[0] != DCP_MARKER, kv[0])):
        (_verify_object if remote else _verify_file)(step_dir, name, entry, report, sizes)
    listed = set(files) | {MANIFEST}
    for name in sorted(sizes) if remote else sorted(p.name for p in step_dir.iterdir()):
        if reader.verified and name not in listed:
            report.notes.append(f"{name} is not listed in {MANIFEST} (added after the save?)")
    if report.ok:
        report.verified = reader.verified
        if DCP_MARKER in sizes if remote else os.path.lexists(step_dir / DCP_MARKER):
            try:
                reader.read_metadata()
            except CheckpointError as e:
                report.fail(str(e))
        elif not files and not (HF_INDEX in sizes if remote else (step_dir / HF_INDEX).is_file()):
            report.fail(f"{step_dir} holds neither DCP {DCP_MARKER} nor a Hugging Face index: not a checkpoint step")
    return report


def _sized(path: Any, size: int | None, entry: dict[str, Any], report: Report) -> bool:
    """Whether the file has the size the manifest records (else the report says how it differs)."""
    if size is None:
        report.fail(f"{path} is missing (listed in {MANIFEST})")
        return False
    if size != entry["size"]:
        where = f"truncated at byte {size}" if size < entry["size"] else f"bytes added after byte {entry['size']}"
        report.fail(f"{path} is corrupt: {size} bytes, {entry['size']} were written ({where})")
        return False
    return True


def _check_segments(path: Any, f: Any, size: int, entry: dict[str, Any], report: Report) -> None:
    """Read ``f`` from its start once, checking each segment (they tile the file) against its checksum."""
    buffer = bytearray(max(min(BLOCK, size), 1))
    view = memoryview(buffer)
    for seg_start, seg_end, digest in entry["segments"]:
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


def _verify_file(step_dir: Path, name: str, entry: dict[str, Any], report: Report, sizes: dict) -> None:
    try:
        path = inside(step_dir, name, "file", CorruptCheckpointError)
        size = regular_size(path, "checkpoint file", CorruptCheckpointError)
        if _sized(path, size, entry, report):
            with open_regular(path, "checkpoint file", CorruptCheckpointError) as f:
                _check_segments(path, f, size, entry, report)
    except CheckpointError as e:
        report.fail(str(e))


def _verify_object(step_dir: ObjectPath, name: str, entry: dict[str, Any], report: Report,
                   sizes: dict[str, int]) -> None:
    """The object-store twin of :func:`_verify_file`: the size from the listing, the bytes in BLOCK-sized GETs."""
    if "/" in name or name in (".", ".."):
        report.fail(f"{step_dir}: the file name {name!r} in {MANIFEST} is not an object of the step")
        return
    path = step_dir / name
    size = sizes.get(name)
    if not _sized(path, size, entry, report):
        return
    try:
        # Read ahead in BLOCK-sized GETs: the segments (one per item) are read in order, many to a GET.
        with client().open(path.path, "rb", block_size=BLOCK, cache_type="readahead") as f:
            _check_segments(path, f, size, entry, report)
    except CheckpointError as e:
        report.fail(str(e))
    except Exception as e:  # noqa: BLE001 - s3fs and botocore errors
        report.fail(str(store_error(e, path, "reading")))


def step_dirs(path: str | os.PathLike) -> list[Any]:
    """The step folders under a checkpoint folder (committed names only), or ``[path]`` for a step folder.

    On an object store a step is committed when its manifest exists; a ``step-N`` prefix without one
    (an interrupted save) is checked only when named.
    """
    if is_url(path):
        from savepoint.checkpoint.object_folder import ObjectFolder

        root = ObjectPath(path)
        if STEP_RE.match(root.name) or {MANIFEST, DCP_MARKER} & set(listing(root)):
            return [root]
        folder = ObjectFolder(root)
        steps = folder.committed_steps()
        if not steps:
            folder.ensure_writable()  # a missing bucket, refused credentials: said as such
        return [folder.step_dir(step) for step in steps]
    path = Path(path)
    if os.path.lexists(path / MANIFEST) or os.path.lexists(path / DCP_MARKER) or STEP_RE.match(path.name):
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder; give a checkpoint folder or one of its step-N folders")
    steps = [(int(p.name[5:]), p) for p in path.iterdir() if STEP_RE.match(p.name) and p.is_dir()]
    return [p for _, p in sorted(steps)]
