"""torchrun, minus the launcher's own traceback when a worker fails.

``python -m savepoint.launch <torchrun args>`` is exactly ``torchrun <torchrun args>``, except that
a worker failure ends with one summary line and the worker's exit code: the worker has already
printed its own one-line error, and torchrun's traceback would only bury it; and SIGTERM (a
scheduler's preemption notice) is passed on to the workers, which finish their step, commit a
checkpoint and exit 0, so the launcher exits 0 as well.

torchrun's own SIGTERM handling would defeat that: it sends the signal to each worker's whole
process group (which also kills an async checkpoint writer process), SIGKILLs the workers after
``--shutdown-timeout`` (30 s by default, whatever the grace period), and then re-raises the signal
as a ``SignalException``, so the launcher exits non-zero with a traceback even when every worker
saved and exited 0. So torchrun is told not to handle SIGTERM (its ``--signals-to-handle``),
and this launcher forwards it to the worker processes alone; torchrun then sees the workers exit
like any others. SIGINT, SIGHUP and SIGQUIT keep torchrun's handling.
"""

from __future__ import annotations

import os
import signal
import sys
from argparse import Namespace
from pathlib import Path
from types import FrameType

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run


def _worker_pids() -> list[int]:
    """This launcher's child processes that are torchrun workers (they have LOCAL_RANK in their environment)."""
    me = str(os.getpid())
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if stat[stat.rindex(")") + 2 :].split()[1] != me:  # fields after "(comm)": state, ppid, ...
                continue
            if b"LOCAL_RANK=" in (entry / "environ").read_bytes():
                pids.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
    return sorted(pids)


def _forward_sigterm(signum: int, frame: FrameType | None) -> None:
    pids = _worker_pids()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    print(f"savepoint: SIGTERM passed on to the {len(pids)} worker(s) (pids {', '.join(map(str, pids))}): they "
          "finish the current step, commit a checkpoint and exit", file=sys.stderr, flush=True)


def forward_sigterm_to_workers(args: Namespace) -> None:
    """Take SIGTERM away from torchrun's handlers and forward it to the workers (see the module doc)."""
    args.signals_to_handle = ",".join(
        s.strip() for s in args.signals_to_handle.split(",") if s.strip() and s.strip() != "SIGTERM")
    signal.signal(signal.SIGTERM, _forward_sigterm)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    forward_sigterm_to_workers(args)
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode if failure.exitcode and failure.exitcode > 0 else 1
        print(f"savepoint: rank {rank} failed with exit code {failure.exitcode}; its error is above "
              f"(rerun with SAVEPOINT_DEBUG=1 for a traceback)", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
