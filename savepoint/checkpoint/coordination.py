"""Agreement among the ranks of one job: barriers, shared verdicts, and work done on rank 0 alone.

The commit protocol needs every rank to reach the same verdict (written, committed, failed), so
that no rank goes on while another saw a step fail, and no rank waits forever in a collective
while rank 0 kept an error to itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from savepoint.errors import (
    CheckpointError,
    CorruptCheckpointError,
    FatalCheckpointError,
    SavepointError,
    UnsafeCheckpointError,
)


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def my_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


# The error classes a failure keeps on every rank, most specific first: a rank's error that is none
# of them (an OSError, DCP's own) arrives on the other ranks as a CheckpointError.
ERROR_KINDS: dict[str, type[SavepointError]] = {
    "FatalCheckpointError": FatalCheckpointError,
    "CorruptCheckpointError": CorruptCheckpointError,
    "UnsafeCheckpointError": UnsafeCheckpointError,
    "CheckpointError": CheckpointError,
}
DEFAULT_KIND = "CheckpointError"


def error_kind(error: BaseException) -> str:
    """The ``ERROR_KINDS`` entry of ``error`` (for DCP's CheckpointException, of the failing rank's own error)."""
    inner = failing_error(error)[1]
    return next((name for name, cls in ERROR_KINDS.items() if isinstance(inner, cls)), DEFAULT_KIND)


@dataclass(frozen=True)
class Failure:
    """A rank's error as every rank receives it: one line ('rank R: Type: message'), the errno of the
    OSError behind it (None if none), and its class (``kind``, a key of ``ERROR_KINDS``)."""

    message: str
    errno: int | None = None
    kind: str = DEFAULT_KIND

    @classmethod
    def of(cls, error: BaseException, rank: int | None = None) -> Failure:
        kind = error_kind(error)
        if kind == "FatalCheckpointError":  # its message says all, ranks included
            return cls(str(failing_error(error)[1]), error_errno(error), kind)
        message = root_cause(error)
        if rank is not None and not message.startswith("rank "):
            message = f"rank {rank}: {message}"
        return cls(message, error_errno(error), kind)

    @property
    def fatal(self) -> bool:
        """No later save can succeed either (the ranks do not share a folder, the lock is lost)."""
        return self.kind == "FatalCheckpointError"

    def error(self, message: str | None = None) -> SavepointError:
        """The failing rank's error class, with ``message`` (default: the failure's own line)."""
        return ERROR_KINDS.get(self.kind, CheckpointError)(self.message if message is None else message)


class Coordinator:
    """Agreement among the ranks of one job, on a gloo group of their own.

    The commit protocol needs every rank to reach the same verdict (written, committed, failed),
    so that no rank goes on while another saw the step fail. A dedicated gloo group keeps these
    small collectives off the training group (nccl on GPU) and works for CPU and CUDA jobs alike.
    """

    def __init__(self) -> None:
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None

    def all_and_any(self, all_value: bool, any_value: bool) -> tuple[bool, bool]:
        """(``all_value`` on every rank, ``any_value`` on some rank), in one collective."""
        (every,), (some,) = self.verdicts([all_value], [any_value])
        return every, some

    def verdicts(self, all_values: list[bool], any_values: list[bool]) -> tuple[list[bool], list[bool]]:
        """(each of ``all_values`` on every rank, each of ``any_values`` on some rank), in one collective."""
        if self.group is None:
            return list(all_values), list(any_values)
        flags = torch.tensor([int(not v) for v in all_values] + [int(v) for v in any_values])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        n = len(all_values)
        return [not f for f in flags[:n].tolist()], [bool(f) for f in flags[n:].tolist()]

    def first_failure(self, error: BaseException | None) -> Failure | None:
        """None if no rank has an error; else the lowest failing rank's Failure, the same on every rank."""
        return self.agree(error)[0]

    def agree(self, error: BaseException | None, report: Any = None) -> tuple[Failure | None, list[Any]]:
        """One gather: the lowest failing rank's Failure (None if every rank succeeded), the same on
        every rank, and every rank's ``report`` (any picklable object), indexed by rank."""
        mine = (None if error is None else Failure.of(error, my_rank()), report)
        if self.group is None:
            return mine[0], [report]
        everyone: list[Any] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(everyone, mine, group=self.group)
        failure = next((f for f, _ in everyone if f is not None), None)
        return failure, [r for _, r in everyone]

    def from_rank0(self, value: Any) -> Any:
        """Rank 0's ``value`` (any picklable object), on every rank."""
        if self.group is None:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def run_on_rank0(self, fn: Callable[[], Any], what: str) -> Any:
        """Run ``fn`` on rank 0 only; every rank gets its result, or raises the same error.

        Other ranks wait in a collective meanwhile, so an error rank 0 kept to itself would hang
        them: every error is caught and shared, and raised on every rank as its ``ERROR_KINDS``
        class (a FatalCheckpointError stays one; errors outside savepoint become CheckpointError).
        """
        outcome: tuple[bool, Any] = (True, None)
        if is_rank0():
            try:
                outcome = (True, fn())
            except SavepointError as e:
                outcome = (False, Failure(str(e), error_errno(e), error_kind(e)))
            except (Exception, CheckpointException) as e:
                outcome = (False, Failure(f"{what} failed: {root_cause(e)}", error_errno(e), error_kind(e)))
        ok, value = self.from_rank0(outcome)
        if not ok:
            raise value.error()
        return value

    def close(self) -> None:
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None


def failing_error(error: BaseException) -> tuple[int | None, BaseException]:
    """(the failing rank, its own error) for DCP's CheckpointException, which wraps each rank's error
    (the lowest failing rank's is taken); ``(None, error)`` for any other error."""
    if isinstance(error, CheckpointException) and error.failures:
        rank, inner = next(iter(error.failures.items()))
        return rank, inner[0] if isinstance(inner, tuple) else inner  # (error, traceback) pairs
    return None, error


def root_cause(error: BaseException) -> str:
    """One line for an error; for DCP's CheckpointException, the first failing rank's own error."""
    rank, inner = failing_error(error)
    prefix = "" if rank is None else f"rank {rank}: "
    return f"{prefix}{type(inner).__name__}: {inner}"


def as_savepoint_error(error: BaseException, what: str) -> SavepointError:
    """A one-line SavepointError for an error raised in one process (e.g. inside DCP, which wraps it):
    the SavepointError behind it as it is, else a CheckpointError ``'<what> failed: Type: message'``."""
    _, inner = failing_error(error)
    if isinstance(inner, SavepointError):
        return inner
    return CheckpointError(f"{what} failed: {type(inner).__name__}: {inner}")


def error_errno(error: BaseException | None) -> int | None:
    """The errno of the OSError behind ``error``: itself, DCP's failing rank's error, or their causes."""
    seen = 0
    while error is not None and seen < 20:
        if isinstance(error, OSError) and error.errno is not None:
            return error.errno
        if isinstance(error, CheckpointException) and error.failures:
            error = failing_error(error)[1]
        else:
            error = error.__cause__ or error.__context__
        seen += 1
    return None
