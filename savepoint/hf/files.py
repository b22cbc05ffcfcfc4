"""The files of an untrusted Hugging Face folder: names that stay inside it, bounded JSON reads.

A folder downloaded from anywhere may hold absolute names, ``..``, symlinks to any file on the
machine, or FIFOs that block forever. Every file savepoint opens in one comes through ``hf_file``
(or ``hub_blob`` for a Hugging Face cache snapshot's links into its repo's ``blobs/``), and every
JSON file through ``read_json``, which bounds its size and refuses anything but a JSON object.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from savepoint.errors import CheckpointError
from savepoint.safe_io import inside, read_regular

# Read bounds: a real config.json is a few kB, a 405B index ~100 kB.
CONFIG_LIMIT = 4 * 1024**2
INDEX_LIMIT = 64 * 1024**2


def hub_blob(root: Path, path: Path) -> Path | None:
    """The blob a Hugging Face cache link stands for, or None when ``path`` is not such a link.

    ``huggingface_hub`` downloads into ``<repo>/blobs/<hash>`` and links each file of
    ``<repo>/snapshots/<revision>/`` to its blob. Such a link is followed, but only when ``root``
    is a snapshot folder and the link resolves to a regular file directly in that repo's
    ``blobs/``; any other link is refused, so a crafted folder cannot lead a read (or an export's
    copy) to ``/etc/shadow`` or ``/proc/self/environ``.
    """
    if not path.is_symlink():
        return None
    snapshot = root.resolve()
    if snapshot.parent.name != "snapshots":
        return None
    blobs = snapshot.parent.parent / "blobs"
    target = path.resolve()
    if target.parent != blobs or not target.is_file() or target.is_symlink():
        return None
    return target


def hf_file(root: Path, name: str, what: str) -> Path:
    """The file to open for a file an HF folder names: ``root / name``, or its blob in the HF cache.

    Raises:
        CheckpointError: ``name`` is absolute, has ``..``, or is (or passes through) a symlink other
            than a Hugging Face cache link (see ``hub_blob``).
    """
    path = root / name
    if not Path(name).is_absolute() and ".." not in Path(name).parts and path.is_symlink():
        blob = hub_blob(root, path)
        if blob is not None and inside(root, str(Path(name).parent), what) is not None:
            return blob
        raise CheckpointError(
            f"{path} is a symbolic link: savepoint reads only regular files inside the Hugging Face folder (or, in "
            "a Hugging Face cache snapshot, links into that repo's blobs/), so it was not followed. Copy the real "
            "files into a folder (`cp -rL SRC DST`, or `hf download REPO --local-dir DST`, which writes no links) "
            "and point at that")
    return inside(root, name, what)  # absolute names, `..` and links further up


def parse_json(raw: bytes, path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except RecursionError:
        raise CheckpointError(f"{path} is not a valid {what}: its JSON nests too deeply; re-download or re-create it")\
            from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not a valid {what}: not JSON ({e}); re-download or re-create it") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} is not a valid {what}: it holds a JSON {type(value).__name__}, not an "
                              "object; re-download or re-create it")
    return value


def read_json(path: Path, limit: int, what: str) -> dict[str, Any]:
    """A JSON object from a regular file of at most ``limit`` bytes.

    Raises:
        CheckpointError: it is missing, not a regular file, too big, not JSON, or not an object.
    """
    try:
        raw = read_regular(hub_blob(path.parent, path) or path, limit, what)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    return parse_json(raw, path, what)
