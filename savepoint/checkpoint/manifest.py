"""The step manifest: its bytes (which check themselves), its one bounded reader, its schema, and the
rule for which steps must have checksums.

The manifest checks itself: ``manifest_checksum`` is the hash of the file's own bytes with that
value blanked, so a flipped bit anywhere in it is caught too. :func:`read_manifest` is the only
reader of ``manifest.json``; :func:`step_checksums` is the one rule for steps without one.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from savepoint.checkpoint.hashing import ALGORITHM, hexdigest
from savepoint.checkpoint.objstore import ObjectPath
from savepoint.durable import MANIFEST
from savepoint.errors import CheckpointError, CorruptCheckpointError
from savepoint.safe_io import read_regular

SELF_KEY = "manifest_checksum"
_BLANK = "0" * 32
MANIFEST_LIMIT = 256 << 20  # a manifest is ~120 bytes per stored item: 256 MiB is ~2 million items
MAX_DEPTH = 32  # a manifest nests 6 levels
STEP_RE = re.compile(r"^step-\d+$")  # a committed step folder
STAGING_RE = re.compile(r"^\.step-\d+\.partial$")  # where savepoint writes a step before committing it


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The manifest as written: JSON whose ``manifest_checksum`` is the hash of these bytes with it blanked."""
    body = {**manifest, SELF_KEY: _BLANK}
    blank = (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()
    digest = hexdigest(blank)
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
    if isinstance(step_dir, ObjectPath):
        from savepoint.checkpoint.object_folder import read_object

        path: Any = step_dir / MANIFEST
        try:
            raw = read_object(path, MANIFEST_LIMIT, "manifest")
        except FileNotFoundError:
            return None
    else:
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
                               hexdigest(raw.replace(_self_field(stored), _self_field(_BLANK), 1)) != stored):
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
    step_dir = step_dir if isinstance(step_dir, ObjectPath) else Path(step_dir)
    if isinstance(step_dir, Path) and STEP_RE.match(step_dir.name) and step_dir.is_symlink():
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


def _sibling_with_manifest(step_dir: Any) -> Any:
    if isinstance(step_dir, ObjectPath):
        from savepoint.checkpoint.object_folder import ObjectFolder

        folder = ObjectFolder(step_dir.parent)
        return next((folder.step_dir(s) for s in folder.committed_steps() if folder.step_dir(s) != step_dir), None)
    try:
        entries = list(os.scandir(step_dir.parent))
    except OSError:
        return None
    for entry in sorted(entries, key=lambda e: e.name):
        if entry.name != step_dir.name and STEP_RE.match(entry.name) and \
                os.path.lexists(os.path.join(entry.path, MANIFEST)):
            return Path(entry.path)
    return None


def written_by_savepoint(metadata: Any) -> str | None:
    """Where ``.metadata`` shows savepoint wrote it (its staging folder's name), else None."""
    checkpoint_id = getattr(getattr(metadata, "storage_meta", None), "checkpoint_id", None)
    if isinstance(checkpoint_id, (str, os.PathLike)):
        name = os.path.basename(os.fspath(checkpoint_id))
        if isinstance(name, str) and STAGING_RE.match(name):
            return name
    return None

