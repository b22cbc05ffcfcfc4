"""One job per object-store folder: a lease object renewed by a heartbeat (an object store has no flock)."""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from typing import Any

from savepoint.checkpoint.object_folder import read_object, write_object
from savepoint.checkpoint.objstore import CONNECT_TIMEOUT, ObjectPath, ObjectStoreError, attempts, client
from savepoint.errors import CheckpointError, FatalCheckpointError

logger = logging.getLogger(__name__)

LEASE = ".savepoint.lock"
LEASE_SECONDS = float(os.environ.get("SAVEPOINT_LEASE_SECONDS", "30"))  # renewed every third of this
_LEASE_LIMIT = 1 << 16

_live_tokens: set[str] = set()  # the leases this process holds now


def _pid_namespace() -> str:
    """This process's pid namespace (containers sharing a host name may not share pids)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return "?"


def _holder() -> dict[str, Any]:
    """Who holds a lease: the host and pid (in its pid namespace), and under torchrun its agent's pid."""
    agent = os.getppid() if os.environ.get("TORCHELASTIC_RUN_ID") else None
    return {"host": socket.gethostname(), "pid_ns": _pid_namespace(), "pid": os.getpid(), "agent_pid": agent,
            "run_id": os.environ.get("TORCHELASTIC_RUN_ID"), "started_unix": time.time()}


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True
    return True


class ObjectLease:
    """One writer per object-store folder: a lease object renewed by a heartbeat, not an flock.

    ``<folder>/.savepoint.lock`` holds the holder (host, pid, torchrun run id), a random token and
    the time it expires. A job takes the lease when there is none, it has expired (its holder
    stopped renewing it for ``SAVEPOINT_LEASE_SECONDS``, 30 s by default), its holder is a dead
    process on this host (in this pid namespace), or it belongs to an earlier worker group started by
    the same torchrun agent (a restart), or to an earlier manager of this very process that ended
    without releasing it. Otherwise
    it stops at once, saying who holds it. A thread renews it every third of
    the lease; a renewal that finds another holder's token marks the lease lost, and the next save
    stops the job (``ensure_held``). Object stores have no compare-and-swap that s3fs exposes, so
    two jobs starting within the same second could both write a lease; each reads it back after a
    quarter second, and the one whose token is not there stops; a lease taken over anyway is found
    at the loser's next renewal.
    """

    def __init__(self, root: ObjectPath):
        self.root = root
        self.path = root / LEASE
        self.token = secrets.token_hex(16)
        self.holder = _holder()
        self._held = False
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._held

    def _read(self) -> dict[str, Any] | None:
        try:
            record = json.loads(read_object(self.path, _LEASE_LIMIT, "lease", CheckpointError))
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError, CheckpointError) as e:
            if isinstance(e, ObjectStoreError):
                raise
            return {"token": None, "expires_unix": 0, "holder": {"host": "?", "pid": "?"}}  # unreadable: stale
        return record if isinstance(record, dict) else None

    def _write(self) -> None:
        now = time.time()
        record = {"format": "savepoint.lease/1", "token": self.token, "holder": self.holder,
                  "renewed_unix": now, "expires_unix": now + LEASE_SECONDS}
        write_object(self.path, json.dumps(record).encode(), "lease")

    def _takeable(self, record: dict[str, Any]) -> bool:
        holder = record.get("holder") or {}
        if not isinstance(holder, dict):
            return True
        try:
            if float(record.get("expires_unix") or 0) < time.time():
                return True
        except (TypeError, ValueError):
            return True  # not a lease savepoint wrote: stale
        mine = self.holder
        if holder.get("host") != mine["host"] or holder.get("pid_ns") != mine["pid_ns"]:
            return False  # another machine or container: only expiry frees its lease
        if holder.get("pid") == mine["pid"]:
            return record.get("token") not in _live_tokens  # an earlier manager of this process that never released it
        if not _pid_alive(holder.get("pid")):
            return True
        # A restart by the same torchrun agent: it started this worker group only after the old one had exited.
        return mine["agent_pid"] is not None and holder.get("agent_pid") == mine["agent_pid"]

    def acquire(self) -> None:
        record = self._read()
        if record is not None and record.get("token") != self.token and not self._takeable(record):
            raise CheckpointError(self._busy_message(record))
        self._write()
        time.sleep(0.25)  # longer than a competitor's read-to-write gap: of two writes, one reads the other's
        again = self._read()
        if again is None or again.get("token") != self.token:
            raise CheckpointError(self._busy_message(again or {}))
        self._held = True
        _live_tokens.add(self.token)
        self._thread = threading.Thread(target=self._heartbeat, name="savepoint-lease", daemon=True)
        self._thread.start()

    def _busy_message(self, record: dict[str, Any]) -> str:
        holder = record.get("holder") or {}
        left = float(record.get("expires_unix") or 0) - time.time()
        return (f"checkpoint folder {self.root} is in use by another job (pid {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')}, whose lease {self.path} expires in {max(left, 0):.0f} s unless it renews "
                f"it); two jobs writing one folder would delete each other's steps. Stop that job, or use another "
                f"--checkpoint.folder; if that job is dead, start again once its lease has expired")

    def _heartbeat(self) -> None:
        while not self._stop.wait(LEASE_SECONDS / 3) and self.renew():
            pass

    def renew(self) -> bool:
        """Extend the lease, unless another job holds it now (then it is lost: returns False)."""
        try:
            record = self._read()
            if self._stop.is_set():
                return False  # released meanwhile: never write the lease again
            if record is not None and record.get("token") != self.token:
                holder = record.get("holder") or {}
                self._lost = (f"the lease {self.path} was taken by pid {holder.get('pid', '?')} on host "
                              f"{holder.get('host', '?')}")
                return False
            self._write()
        except ObjectStoreError as e:
            logger.warning("renewing the checkpoint folder's lease failed (%s); retrying", e)
        return True

    def ensure_held(self) -> None:
        """Before each save: the lease is still this job's.

        Raises:
            FatalCheckpointError: another job took it (this one stopped renewing it long enough).
        """
        if self._lost is not None:
            raise FatalCheckpointError(f"{self._lost}: another job now writes {self.root}; stopping so that the two "
                                       "jobs do not delete each other's steps")

    def release(self) -> None:
        if not self._held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=CONNECT_TIMEOUT * attempts() + 10)  # a renewal in flight ends first
        self._held = False
        _live_tokens.discard(self.token)
        try:
            record = self._read()
            if record is not None and record.get("token") == self.token:
                client().rm_file(self.path.path)
        except Exception as e:  # noqa: BLE001
            logger.warning("could not remove the lease %s (%s); it expires by itself", self.path, e)
