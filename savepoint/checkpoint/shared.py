"""The start-up check that every rank sees one checkpoint folder.

A step is committed by rank 0 only when its folder holds every rank's files (``completeness.py``),
so ranks that save into different folders (node-local disks, or ranks started in different
current folders with a relative path) can never commit a step. This check finds that before the
first step instead of at the first save: rank 0 writes a probe file with a random token into the
folder, every rank looks for it, and if some rank does not see it the job stops at once, naming
the rank, its host and the folder as that rank resolves it.
"""

from __future__ import annotations

import logging
import secrets
import socket
from pathlib import Path
from typing import Any

from savepoint.checkpoint.coordination import Coordinator, is_rank0
from savepoint.checkpoint.objstore import ObjectPath
from savepoint.durable import write_file
from savepoint.errors import CheckpointError, FatalCheckpointError

logger = logging.getLogger(__name__)

PROBE_PREFIX = ".savepoint.probe-"


def _write_probe(root: Any) -> tuple[str, str, str]:
    """Rank 0: remove probes an interrupted start left, write a new one; returns (its name, token, host)."""
    token = secrets.token_hex(16)
    name = PROBE_PREFIX + token[:8]
    if isinstance(root, ObjectPath):
        from savepoint.checkpoint.object_folder import listing, write_object

        for old in listing(root):
            if old.startswith(PROBE_PREFIX):
                _remove(root / old)
        write_object(root / name, token.encode(), "probe")
    else:
        for old in root.glob(PROBE_PREFIX + "*"):
            old.unlink(missing_ok=True)
        write_file(root / name, token.encode())
    return name, token, socket.gethostname()


def _sees(path: Any, token: str) -> bool:
    try:
        if isinstance(path, ObjectPath):
            from savepoint.checkpoint.object_folder import read_object

            return read_object(path, 64, "probe") == token.encode()
        return path.is_file() and not path.is_symlink() and path.read_bytes()[:64] == token.encode()
    except (OSError, CheckpointError):
        return False


def _remove(path: Any) -> None:
    if isinstance(path, ObjectPath):
        from savepoint.checkpoint.objstore import client

        try:
            client().rm_file(path.path)
        except Exception as e:  # noqa: BLE001
            logger.warning("could not remove the probe %s (%s)", path, e)
    else:
        path.unlink(missing_ok=True)


def check_shared(coord: Coordinator, root: Path) -> None:
    """Every rank sees the probe rank 0 writes into ``root`` (the checkpoint folder, which rank 0 has made).

    Raises:
        FatalCheckpointError: on every rank alike, naming each rank that does not see it.
    """
    if coord.group is None:
        return
    name, token, host0 = coord.run_on_rank0(lambda: _write_probe(root), f"writing a probe file into {root}")
    mine = (_sees(root / name, token), socket.gethostname(), str(root.absolute()))
    _, views = coord.agree(None, mine)
    if is_rank0():
        _remove(root / name)
    blind = [(rank, host, where) for rank, (seen, host, where) in enumerate(views) if not seen]
    if not blind:
        return
    where = "; ".join(f"rank {rank} on host {host} saves into {folder}" for rank, host, folder in blind[:4])
    more = f" (and {len(blind) - 4} more ranks)" if len(blind) > 4 else ""
    raise FatalCheckpointError(
        f"the checkpoint folder is not shared between ranks: rank 0 on host {host0} saves into {views[0][2]}, "
        f"but {where}{more}, and {'it does' if len(blind) == 1 else 'they do'} not see the file {name} rank 0 "
        "just wrote there (node-local disks, or ranks started in different folders with a relative path), so no "
        "step could ever hold every rank's shards; stopping before the first step. Every rank must save into "
        "one folder that all of them see: put --job.dump_folder (or --checkpoint.folder) on a filesystem "
        "shared by every node (NFS, Lustre, GPFS, ...), at the same path on every node")
