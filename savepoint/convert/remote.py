"""The converters' ``s3://`` inputs and outputs.

A Hugging Face input on an object store is downloaded into a temporary folder first (safetensors
reads files); a DCP input is read in place, by ranged GETs of each tensor's bytes
(``object_io.ObjectReader``). An output on an object store is converted into a temporary folder and
then uploaded, its marker file last (``.metadata`` for DCP, the index for a Hugging Face folder), so
an interrupted upload never looks like a complete checkpoint; a failed one removes what it uploaded.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from savepoint.checkpoint.object_folder import downloaded, remove_prefix
from savepoint.checkpoint.objstore import ObjectPath, ObjectStoreError, client, is_url, store_error
from savepoint.durable import DCP_MARKER, HF_INDEX
from savepoint.errors import CheckpointError

MARKERS = (DCP_MARKER, HF_INDEX, "config.json")  # uploaded last, in this order


@contextmanager
def local_input(value: str, hf: bool) -> Iterator[str]:
    """``value`` as the converter reads it: an HF folder on an object store downloaded, else as given."""
    if hf and is_url(value):
        with downloaded(ObjectPath(value)) as local:
            yield str(local)
    else:
        yield value


def _holds_anything(out: ObjectPath) -> bool:
    try:
        return bool(client().ls(out.path, detail=False))
    except FileNotFoundError:
        return False
    except Exception as e:  # noqa: BLE001
        raise store_error(e, out, "listing the output") from None


@contextmanager
def local_output(value: str) -> Iterator[str]:
    """Where the converter writes: ``value``, or for an ``s3://`` output a temporary folder uploaded afterwards.

    Raises:
        CheckpointError: the ``s3://`` output already holds objects (left untouched), or the upload failed
            (what it uploaded is removed).
    """
    if not is_url(value):
        yield value
        return
    out = ObjectPath(value)
    if _holds_anything(out):
        raise CheckpointError(f"output {out} already holds objects; nothing was written and it was left untouched. "
                              "Choose a new output prefix or remove it first")
    work = Path(tempfile.mkdtemp(prefix="savepoint-convert-"))
    try:
        local = work / "out"
        yield str(local)
        files = sorted((p for p in local.iterdir() if p.is_file()),
                       key=lambda p: (MARKERS.index(p.name) if p.name in MARKERS else -1, p.name))
        try:
            for path in files:
                try:
                    client().put_file(str(path), (out / path.name).path)
                except Exception as e:  # noqa: BLE001
                    raise store_error(e, out / path.name, "uploading") from None
        except ObjectStoreError:
            try:
                remove_prefix(out)
            except ObjectStoreError:
                pass
            raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
