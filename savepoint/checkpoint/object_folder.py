"""A checkpoint folder on an object store (``s3://bucket/prefix``): the commit protocol without rename.

An object store has no rename and no folders, so a step is committed by its manifest instead:

1. ``begin``: whatever is under ``step-N/`` (an earlier, uncommitted attempt) is removed, and rank
   0's staging mark is written there (see ``completeness.py``).
2. Every rank writes its objects under ``step-N/`` directly (DCP's ``__<rank>_<n>.distcp`` plus
   checksum sidecars; rank 0 also ``.metadata``). An object is visible only once its upload is
   complete, so a killed writer leaves at most whole objects of an uncommitted step.
3. ``commit``: rank 0 checks that every rank's objects are there with their sizes, folds the
   sidecars into the manifest and writes ``step-N/manifest.json`` **last**. That object is the
   commit marker: discovery, auto-resume, retention, ``load_step`` and ``verify`` know only steps
   whose manifest exists, and loading checks every byte against it.

A prefix ``step-N/`` without a manifest is an interrupted save (or deletion), removed at the next
start. Deletion removes the manifest first, then the data, so a half-deleted step is never a step.
A re-save of a step that is already committed removes the old one first (there is no rename to
keep both): this happens only after ``--checkpoint.load_step`` went back past it.

The folder lock becomes a lease (``object_lease.py``).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from savepoint.checkpoint.completeness import STAGING_MARK, WriterView, check_complete
from savepoint.checkpoint.hashing import ALGORITHM, BLOCK, SIDECAR_SUFFIX, hexdigest
from savepoint.checkpoint.objstore import ObjectPath, ObjectStoreError, client, store_error
from savepoint.checkpoint.storage import STEP_DIR_RE, CheckpointFolder
from savepoint.durable import DCP_MARKER, HF_INDEX, MANIFEST
from savepoint.errors import CheckpointError, CorruptCheckpointError

logger = logging.getLogger(__name__)



def read_object(path: ObjectPath, limit: int, what: str = "object",
                error: type[Exception] = CorruptCheckpointError) -> bytes:
    """The whole object at ``path`` if it has at most ``limit`` bytes (one ranged GET).

    Raises:
        FileNotFoundError: no such object.
        error: it is larger than ``limit``.
        ObjectStoreError: the store failed the request.
    """
    try:
        data = client().cat_file(path.path, start=0, end=limit + 1)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - s3fs raises OSError subclasses and botocore errors
        if isinstance(e, FileNotFoundError):
            raise
        raise store_error(e, path, f"reading the {what}") from None
    if len(data) > limit:
        raise error(f"{path} is larger than a {what} can be ({limit:,} bytes); it is not one savepoint wrote")
    return data


def write_object(path: ObjectPath, data: bytes, what: str = "object") -> None:
    try:
        client().pipe_file(path.path, data)
    except Exception as e:  # noqa: BLE001
        raise store_error(e, path, f"writing the {what}") from None


def listing(prefix: ObjectPath) -> dict[str, int]:
    """The objects directly under ``prefix`` (name -> size); sub-prefixes are left out."""
    try:
        entries = client().ls(prefix.path, detail=True)
    except FileNotFoundError:
        return {}
    except Exception as e:  # noqa: BLE001
        raise store_error(e, prefix, "listing") from None
    return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
            for e in entries if e.get("type") == "file"}


def remove_prefix(prefix: ObjectPath, first: str | None = None) -> None:
    """Delete every object under ``prefix`` (``first``, if named and there, before the others)."""
    fs = client()
    try:
        names = list(listing(prefix))
        if first is not None and first in names:
            fs.rm_file((prefix / first).path)
            names.remove(first)
        found = fs.find(prefix.path)
        if found:
            fs.rm(found)
    except ObjectStoreError:
        raise
    except FileNotFoundError:
        return
    except Exception as e:  # noqa: BLE001
        raise store_error(e, prefix, "deleting") from None


class ObjectFolder(CheckpointFolder):
    """One ``s3://bucket/prefix`` checkpoint folder: its steps and how they come and go."""

    def __init__(self, root: ObjectPath | str):
        self.root = ObjectPath(root)  # type: ignore[assignment]

    def staging_dir(self, step: int) -> ObjectPath:  # type: ignore[override]
        return self.step_dir(step)  # written in place: the manifest, last, commits it

    def ensure_writable(self) -> None:
        """Check the bucket answers (credentials, bucket, endpoint) before anything is written."""
        fs = client()
        try:
            fs.ls(self.root.bucket, detail=False)
        except Exception as e:  # noqa: BLE001
            raise store_error(e, self.root, "opening the checkpoint folder") from None

    # ---- discovery -------------------------------------------------------------------------

    def _step_prefixes(self) -> dict[int, ObjectPath]:
        try:
            entries = client().ls(self.root.path, detail=True)
        except FileNotFoundError:
            return {}
        except Exception as e:  # noqa: BLE001
            raise store_error(e, self.root, "listing the checkpoint folder") from None
        steps = {}
        for entry in entries:
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            match = STEP_DIR_RE.match(name)
            if match and entry.get("type") == "directory":
                steps[int(match.group(1))] = self.root / name
        return steps

    def committed_steps(self) -> list[int]:
        """Steps whose ``manifest.json`` exists (the commit marker), ascending."""
        try:
            manifests = client().glob(f"{self.root.path}/step-*/{MANIFEST}")
        except FileNotFoundError:
            return []
        except Exception as e:  # noqa: BLE001
            raise store_error(e, self.root, "listing the checkpoint folder") from None
        steps = []
        for name in manifests:
            match = STEP_DIR_RE.match(name.rstrip("/").split("/")[-2])
            if match:
                steps.append(int(match.group(1)))
        return sorted(steps)

    @staticmethod
    def is_committed(step_dir: Any) -> bool:
        return MANIFEST in listing(ObjectPath(step_dir))

    def is_hf(self, step: int) -> bool:
        names = listing(self.step_dir(step))
        return HF_INDEX in names and DCP_MARKER not in names

    # ---- the commit protocol -----------------------------------------------------------------

    def clean_leftovers(self) -> None:
        """Remove every ``step-N/`` without a manifest: an interrupted save or deletion."""
        committed = set(self.committed_steps())
        for step, prefix in sorted(self._step_prefixes().items()):
            if step not in committed:
                logger.warning("removing leftover %s from an interrupted save or deletion (it has no %s)",
                               prefix, MANIFEST)
                remove_prefix(prefix)
        self._abort_uploads()

    def _abort_uploads(self) -> None:
        """Abort multipart uploads a killed writer left under this folder (invisible, but the store keeps their parts).

        Runs under the lease, so no upload of a live job of this folder is among them.
        """
        fs = client()
        bucket, _, key = self.root.path.partition("/")
        try:
            uploads = fs.call_s3("list_multipart_uploads", Bucket=bucket,
                                 Prefix=f"{key}/" if key else "").get("Uploads", []) or []
            for upload in uploads:
                fs.abort_mpu(bucket, upload["Key"], upload["UploadId"])
        except Exception as e:  # noqa: BLE001 - tidying only: a store without the call, or no permission
            logger.warning("could not abort unfinished uploads under %s (%s); they are invisible, but the store "
                           "keeps their parts until its lifecycle rules remove them", self.root, e)
            return
        if uploads:
            logger.warning("aborted %d unfinished upload(s) under %s left by an interrupted save", len(uploads),
                           self.root)

    def begin(self, step: int) -> ObjectPath:  # type: ignore[override]
        staging = self.step_dir(step)
        if listing(staging):
            if MANIFEST in listing(staging):
                logger.warning("re-saving step %d: removing the committed %s first (an object store cannot keep "
                               "both while the new one is written)", step, staging)
            remove_prefix(staging, first=MANIFEST)
        write_object(staging / STAGING_MARK, secrets.token_hex(16).encode(), "staging mark")
        return staging

    def commit(self, step: int, manifest: bytes) -> ObjectPath:  # type: ignore[override]
        staging = self.step_dir(step)
        names = listing(staging)
        if DCP_MARKER not in names and HF_INDEX not in names:
            raise CheckpointError(f"refusing to commit {staging}: the writer produced no {DCP_MARKER}")
        write_object(staging / MANIFEST, manifest, "manifest (the commit marker)")
        return staging

    def abort(self, step: int) -> None:
        try:
            remove_prefix(self.step_dir(step), first=MANIFEST)
        except ObjectStoreError as e:
            logger.warning("could not remove the uncommitted %s (%s); the next start removes it",
                           self.step_dir(step), e)

    def delete(self, step: int) -> None:
        try:
            remove_prefix(self.step_dir(step), first=MANIFEST)  # uncommitted at once, then its data
        except ObjectStoreError as e:
            raise OSError(str(e)) from None  # retention warns and goes on

    # ---- what a save needs -------------------------------------------------------------------

    def lock(self) -> Any:
        from savepoint.checkpoint.object_lease import ObjectLease

        return ObjectLease(self.root)

    def dcp_writer(self, staging: Any) -> Any:
        from savepoint.checkpoint.object_io import ObjectHashingWriter

        return ObjectHashingWriter(staging)

    def writer_view(self, staging: Any, rank: int) -> WriterView:
        files: dict[str, int] = {}
        mark: str | None = None
        try:
            names = listing(staging)
            if STAGING_MARK in names:
                mark = read_object(staging / STAGING_MARK, 64, "staging mark", CheckpointError).decode("ascii",
                                                                                                      "replace")
            for name in sorted(names):
                if re.match(rf"^\.__{rank}_\d+\.distcp{re.escape(SIDECAR_SUFFIX)}$", name):
                    try:
                        record = json.loads(read_object(staging / name, 1 << 24, "checksum sidecar"))
                        files[str(record["file"])] = int(record["size"])
                    except (CheckpointError, ValueError, KeyError, TypeError, FileNotFoundError):
                        files[name] = -1
        except ObjectStoreError:
            pass  # rank 0 reports the missing mark or files
        return WriterView(rank, socket.gethostname(), str(self.root), mark, files)

    def check_complete(self, step: int, staging: Any, views: list) -> None:
        from savepoint.checkpoint.object_io import ObjectReader

        sizes = listing(staging)
        metadata = ObjectReader(staging).read_metadata() if DCP_MARKER in sizes else None
        check_complete(step, staging, views, size_of=sizes.get, metadata=metadata)

    def seal(self, staging: Any) -> tuple[dict[str, Any], dict[str, int]]:
        """Drop the mark; fold the sidecars into checksums (hashing what no writer hashed); remove the sidecars."""
        fs = client()
        try:
            fs.rm_file((staging / STAGING_MARK).path)
        except FileNotFoundError:
            pass
        except Exception as e:  # noqa: BLE001
            raise store_error(e, staging, "removing the staging mark from") from None
        sizes = listing(staging)
        sidecars = sorted(n for n in sizes if n.startswith(".") and n.endswith(SIDECAR_SUFFIX))
        files: dict[str, Any] = {}
        for sidecar in sidecars:
            record = json.loads(read_object(staging / sidecar, 1 << 24, "checksum sidecar"))
            if sizes.get(record["file"]) != record["size"]:
                raise CheckpointError(f"{staging / record['file']}: the writer hashed {record['size']} bytes but the "
                                      f"object has {sizes.get(record['file'])}; refusing to commit an incomplete write")
            files[record["file"]] = {"size": record["size"], "segments": record["segments"]}
        for name in sorted(sizes):
            if name not in files and name != MANIFEST and name not in sidecars:
                files[name] = _hash_object(staging / name, sizes[name])
        if sidecars:
            try:
                fs.rm([(staging / s).path for s in sidecars])
            except Exception as e:  # noqa: BLE001
                raise store_error(e, staging, "removing checksum sidecars from") from None
        return {"algorithm": ALGORITHM, "files": files}, {n: sizes[n] for n in sorted(files)}

    def step_bytes(self, step: int) -> int:
        return sum(listing(self.step_dir(step)).values())


def _hash_object(path: ObjectPath, size: int) -> dict[str, Any]:
    segments = []
    for start in range(0, size, BLOCK):
        end = min(start + BLOCK, size)
        try:
            data = client().cat_file(path.path, start=start, end=end)
        except Exception as e:  # noqa: BLE001
            raise store_error(e, path, "reading") from None
        segments.append([start, end, hexdigest(data)])
    return {"size": size, "segments": segments}


@contextmanager
def uploaded_from_local(target: ObjectPath) -> Iterator[Path]:
    """A local temporary folder whose files are uploaded under ``target`` when the block succeeds.

    For writers that need a filesystem (safetensors): a Hugging Face export on an object store.
    """
    local = Path(tempfile.mkdtemp(prefix="savepoint-upload-"))
    try:
        yield local
        for path in sorted(local.iterdir()):
            if path.is_file():
                try:
                    client().put_file(str(path), (target / path.name).path)
                except Exception as e:  # noqa: BLE001
                    raise store_error(e, target / path.name, "uploading") from None
    finally:
        shutil.rmtree(local, ignore_errors=True)


@contextmanager
def downloaded(source: ObjectPath, limit: int = 1 << 40) -> Iterator[Path]:
    """The objects directly under ``source`` in a local temporary folder, removed afterwards."""
    local = Path(tempfile.mkdtemp(prefix="savepoint-download-"))
    try:
        objects = listing(source)
        if not objects:
            raise CheckpointError(f"{source} holds no objects: check the URL (a folder of files such as "
                                  "model.safetensors and config.json)")
        if sum(objects.values()) > limit:
            raise CheckpointError(f"{source} holds {sum(objects.values()):,} bytes, more than {limit:,}")
        for name in sorted(objects):
            try:
                client().get_file((source / name).path, str(local / name))
            except Exception as e:  # noqa: BLE001
                raise store_error(e, source / name, "downloading") from None
        yield local
    finally:
        shutil.rmtree(local, ignore_errors=True)
