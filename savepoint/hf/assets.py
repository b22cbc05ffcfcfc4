"""The tokenizer and generation files an HF export carries, copied from ``--hf_assets_path``.

Only regular files are copied, never through a symlink (except a Hugging Face cache snapshot's
links into its repo's ``blobs/``): the export is made to be shared, and a link named
``tokenizer.json`` could point at ``/etc/shadow``. The assets' ``config.json`` gives the export's
bos/eos token ids, or its tokenizer does; an export with token ids and no ``generation_config.json`` of
its own gets one.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from pathlib import Path
from typing import Any

from savepoint.data.tokenizer import HFTokenizer
from savepoint.durable import fsync_file
from savepoint.errors import CheckpointError, SavepointError
from savepoint.hf.files import CONFIG_LIMIT, hub_blob, read_json
from savepoint.safe_io import describe_mode, open_regular

logger = logging.getLogger(__name__)

# Files copied from --model.hf_assets_path into an exported folder, besides the weights.
ASSET_PATTERNS = ("tokenizer*", "special_tokens_map.json", "generation_config.json", "*.tiktoken")
ASSET_LIMIT = 1024**3  # a tokenizer file is at most a few tens of MB


def asset_files(src: Path, flag: str) -> dict[str, Path]:
    """The tokenizer and generation files of ``src`` that an export copies (``ASSET_PATTERNS``), by name.

    Each maps to the file to read: itself, or in a Hugging Face cache snapshot the blob it links to.

    Only regular files are copied, never through a symlink: a link named ``tokenizer.json`` could
    point at ``/etc/shadow`` or ``/proc/self/environ``, and the export is made to be shared.
    Folders matching a pattern are not files and are passed over.

    Raises:
        CheckpointError: ``src`` is not a folder, or a matching name is a symlink, FIFO, device or
            socket, or a file too big to be a tokenizer (naming it and ``flag``).
    """
    if not src.is_dir():
        raise CheckpointError(f"{flag}={src} is not a folder; point it at the HF model folder holding the "
                              "tokenizer files, or leave it unset")
    files = {}
    for name in sorted({p.name for pattern in ASSET_PATTERNS for p in src.glob(pattern)}):
        path = src / name
        mode = os.lstat(path).st_mode
        blob = hub_blob(src, path)
        if blob is not None:  # a Hugging Face cache snapshot's link into its repo's blobs/
            path, mode = blob, os.lstat(blob).st_mode
        if stat.S_ISDIR(mode):
            continue
        if not stat.S_ISREG(mode):
            raise CheckpointError(
                f"{flag}: {path} is {describe_mode(mode)}, not a regular file; an export copies only regular files "
                "(never through a link), so it would lack this one. Put the real file there (`cp -L`), or point "
                f"{flag} at a folder of real files (`hf download REPO --local-dir DST` writes no links)")
        if os.lstat(path).st_size > ASSET_LIMIT:
            raise CheckpointError(f"{flag}: {path} is {os.lstat(path).st_size:,} bytes, more than a tokenizer file "
                                  f"can be ({ASSET_LIMIT:,}); remove it from the folder")
        files[name] = path
    return files


def check_export_assets(src: str | Path | None, flag: str) -> tuple[Any, Any]:
    """Check the assets folder of an export before anything is written; returns its (bos, eos) token ids.

    Without a folder, or with one holding no tokenizer files, the export still loads in
    transformers but cannot tokenize or generate: that is a warning naming ``flag``.

    Raises:
        CheckpointError: see ``asset_files`` and ``asset_token_ids``.
    """
    if src is None:
        logger.warning("%s is not set: the Hugging Face export will have no tokenizer files and no "
                       "generation_config.json, and bos_token_id/eos_token_id null in its config.json; set %s to the "
                       "original HF model folder to include them", flag, flag)
        return None, None
    src = Path(src)
    if not asset_files(src, flag):
        logger.warning("%s=%s holds no tokenizer files (%s): the Hugging Face export will have none; point %s at the "
                       "original HF model folder", flag, src, ", ".join(ASSET_PATTERNS), flag)
    return asset_token_ids(src, flag)


def copy_assets(src: Path, dst: Path, flag: str = "--model.hf_assets_path") -> list[str]:
    """Copy tokenizer and generation files (never weights, index or config) from ``src`` to ``dst``.

    A name that is not a regular file by the time it is copied (a link or FIFO put there after
    ``asset_files`` checked the folder) is skipped with a warning: the weights matter more than
    one tokenizer file. Returns the names copied.

    Raises:
        CheckpointError: see ``asset_files``.
    """
    copied, skipped = [], []
    for name, path in asset_files(src, flag).items():
        try:
            with open_regular(path, "tokenizer file") as f, open(dst / name, "xb") as out:
                shutil.copyfileobj(f, out)
        except (CheckpointError, FileNotFoundError) as e:
            skipped.append(f"{name} ({e})")
            continue
        fsync_file(dst / name)
        copied.append(name)
    if skipped:
        logger.warning("the Hugging Face export in %s lacks %s from %s=%s: not a regular file when copied",
                       dst, "; ".join(skipped), flag, src)
    return copied


def asset_token_ids(src: Path | None, flag: str) -> tuple[Any, Any]:
    """bos/eos token ids of the assets folder: its ``config.json``'s, else its tokenizer's (else None).

    An id ``config.json`` leaves out comes from the tokenizer (``tokenizer.json`` with the BOS/EOS
    ``tokenizer_config.json`` names), as training reads it; a tokenizer that cannot be read leaves
    the id null, with a warning.

    Raises:
        CheckpointError: that config.json is not a regular JSON object, or its ids are not integers.
    """
    if src is None:
        return None, None
    ids: tuple[Any, Any] = (None, None)
    if os.path.lexists(src / "config.json"):
        config = read_json(src / "config.json", CONFIG_LIMIT, f"model config ({flag})")
        ids = config.get("bos_token_id"), config.get("eos_token_id")
    for name, value in zip(("bos_token_id", "eos_token_id"), ids, strict=True):
        values = value if isinstance(value, list) else [value]
        if value is not None and not all(type(v) is int for v in values):
            raise CheckpointError(f"{flag}: {src}/config.json has {name}={value!r}; it must be a token id (an "
                                  "integer) or a list of them. Fix the file or point the flag at another folder")
    if None in ids and os.path.lexists(src / "tokenizer.json"):
        try:
            tokenizer = HFTokenizer(src, flag)
        except SavepointError as e:
            logger.warning("the Hugging Face export's config.json gets no bos/eos token ids from the tokenizer: %s", e)
            return ids
        ids = (tokenizer.bos_id if ids[0] is None else ids[0], tokenizer.eos_id if ids[1] is None else ids[1])
    return ids


def generation_config(bos_token_id: Any, eos_token_id: Any) -> dict[str, Any] | None:
    """The ``generation_config.json`` an export without one gets (None without token ids)."""
    if bos_token_id is None and eos_token_id is None:
        return None
    return {"_from_model_config": True, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id}
