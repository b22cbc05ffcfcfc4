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
from savepoint.checkpoint.reader import VerifyingReader
from savepoint.durable import DCP_MARKER, HF_INDEX, MANIFEST
from savepoint.errors import CheckpointError, CorruptCheckpointError
from savepoint.safe_io import inside, open_regular, regular_size


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
    for name, entry in sorted(files.items(), key=lambda kv: (kv[0] != DCP_MARKER, kv[0])):
        _verify_file(step_dir, name, entry, report)
    listed = set(files) | {MANIFEST}
    for path in sorted(step_dir.iterdir()):
        if reader.verified and path.name not in listed:
            report.notes.append(f"{path.name} is not listed in {MANIFEST} (added after the save?)")
    if report.ok:
        report.verified = reader.verified
        if os.path.lexists(step_dir / DCP_MARKER):
            try:
                reader.read_metadata()
            except CheckpointError as e:
                report.fail(str(e))
        elif not files and not (step_dir / HF_INDEX).is_file():
            report.fail(f"{step_dir} holds neither DCP {DCP_MARKER} nor a Hugging Face index: not a checkpoint step")
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
    if os.path.lexists(path / MANIFEST) or os.path.lexists(path / DCP_MARKER) or STEP_RE.match(path.name):
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder; give a checkpoint folder or one of its step-N folders")
    steps = [(int(p.name[5:]), p) for p in path.iterdir() if STEP_RE.match(p.name) and p.is_dir()]
    return [p for _, p in sorted(steps)]
