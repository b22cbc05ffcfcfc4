"""Agreement among the ranks of one job: barriers, shared verdicts, and work done on rank 0 alone.

The commit protocol needs every rank to reach the same verdict (written, committed, failed), so
that no rank goes on while another saw a step fail, and no rank waits forever in a collective
while rank 0 kept an error to itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from savepoint.errors import CheckpointError, SavepointError


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class Coordinator:
    """Barriers and agreement among the ranks of one job, on a gloo group of their own.

    The commit protocol needs every rank to reach the same verdict (written, committed, failed),
    so that no rank goes on while another saw the step fail. A dedicated gloo group keeps these
    small collectives off the training group (nccl on GPU) and works for CPU and CUDA jobs alike.
    """

    def __init__(self) -> None:
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None

    def barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)

    def all_true(self, value: bool) -> bool:
        """True only if ``value`` on every rank."""
        if self.group is None:
            return value
        flag = torch.tensor([int(value)])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())

    def any_true(self, value: bool) -> bool:
        """True if ``value`` on some rank."""
        return self.all_and_any(True, value)[1]

    def all_and_any(self, all_value: bool, any_value: bool) -> tuple[bool, bool]:
        """(``all_value`` on every rank, ``any_value`` on some rank), in one collective."""
        if self.group is None:
            return all_value, any_value
        flags = torch.tensor([int(not all_value), int(any_value)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        return not flags[0].item(), bool(flags[1].item())

    def first_failure(self, error: BaseException | None) -> str | None:
        """None if no rank has an error; else the lowest failing rank's, as 'rank R: Type: message'."""
        mine = None if error is None else root_cause(error)
        if self.group is None:
            return mine
        everyone: list[str | None] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(everyone, mine, group=self.group)
        for rank, message in enumerate(everyone):
            if message is not None:
                return message if message.startswith("rank ") else f"rank {rank}: {message}"
        return None

    def from_rank0(self, value: Any) -> Any:
        """Rank 0's ``value`` (any picklable object), on every rank."""
        if self.group is None:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def run_on_rank0(self, fn: Callable[[], Any], what: str) -> Any:
        """Run ``fn`` on rank 0 only; every rank gets its result, or raises the same CheckpointError.

        Other ranks wait in a collective meanwhile, so an error rank 0 kept to itself would hang
        them: every error is caught and shared.
        """
        outcome: tuple[bool, Any] = (True, None)
        if is_rank0():
            try:
                outcome = (True, fn())
            except SavepointError as e:
                outcome = (False, str(e))
            except (Exception, CheckpointException) as e:
                outcome = (False, f"{what} failed: {root_cause(e)}")
        ok, value = self.from_rank0(outcome)
        if not ok:
            raise CheckpointError(value)
        return value

    def close(self) -> None:
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None


def root_cause(error: BaseException) -> str:
    """One line for an error; for DCP's CheckpointException, the first failing rank's own error."""
    if isinstance(error, CheckpointException) and error.failures:
        rank, (inner, _trace) = next(iter(error.failures.items()))
        return f"rank {rank}: {type(inner).__name__}: {inner}"
    return f"{type(error).__name__}: {error}"
