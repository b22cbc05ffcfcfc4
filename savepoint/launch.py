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
like any others. SIGINT, SIGHUP and SIGQUIT keep torchrun's handling. SIGTERM while no worker
runs (the launcher waits in rendezvous for the other nodes) has no one to pass it to: the launcher
then exits at once with status 143 (128 + SIGTERM, see ``EXIT_TERMINATED``).

Workers die with the launcher, however it dies. torchrun starts each worker in a session of its
own, so a SIGKILL of the launcher, or of its process group (a terminal, ``kill -9 -PGID``, a batch
system without cgroups), would leave every worker running: training on, writing checkpoints and
holding the folder lock, so that the restart fails. So each worker starts as ``python -I -S
savepoint/lifeline.py LAUNCHER_PID COMMAND...``, which asks the kernel to SIGKILL it when the
launcher goes (``prctl(PR_SET_PDEATHSIG)``), checks that the launcher is still its parent (it may
have died before that call), and execs the worker command: the worker keeps its pid and its command
line, and the death signal survives the exec. The kernel sends it when the *thread* that forked the
worker exits: torchrun forks workers in its main thread (``LocalElasticAgent._start_workers``,
called by ``run``), which lives as long as the launcher, and ``main`` checks it runs there. A
worker's checkpoint writer process dies with its worker (see ``savepoint.lifeline``). Workers (and
their children) find the launcher's pid in ``SAVEPOINT_LAUNCHER_PID``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from argparse import Namespace
from pathlib import Path
from types import FrameType

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError
from torch.distributed.run import parse_args, run

from savepoint import lifeline


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


# The exit status for SIGTERM with no worker to pass it to: 128 + 15, what a shell reports for a
# process ended by SIGTERM, and what Kubernetes and Slurm show for a job terminated that way. A
# scheduler then sees "terminated" (requeue it), neither 0 (done, with a checkpoint) nor 1 (failed).
EXIT_TERMINATED = 128 + signal.SIGTERM

# The environment variable that tells a worker (and its children) which launcher started it.
LAUNCHER_PID_ENV = "SAVEPOINT_LAUNCHER_PID"


def die_with_launcher(args: Namespace) -> None:
    """Start every worker through ``savepoint/lifeline.py`` (see the module doc): it dies with this launcher."""
    if args.run_path or (args.no_python and args.module):
        return  # a function in a multiprocessing child, not a command (or torchrun's own usage error)
    python = os.getenv("PYTHON_EXEC", sys.executable)
    worker = [args.training_script] if args.no_python else \
        [python, "-u", *(["-m"] if args.module else []), args.training_script]
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())  # workers inherit the launcher's environment
    args.no_python, args.module = True, False
    args.training_script = python
    # -I -S: no site-packages, no environment, no current directory: the wrapper starts in ~20 ms.
    args.training_script_args = ["-I", "-S", lifeline.__file__, str(os.getpid()), *worker, *args.training_script_args]


def _forward_sigterm(signum: int, frame: FrameType | None) -> None:
    pids = _worker_pids()
    if not pids:
        # Waiting in rendezvous (or between worker groups): nothing runs that could save, and torchrun
        # would wait out its rendezvous timeout. Workers forked meanwhile die with this process.
        print(f"savepoint: SIGTERM with no worker running (waiting for the other nodes to join): nothing to "
              f"checkpoint; exiting with status {EXIT_TERMINATED}", file=sys.stderr, flush=True)
        os._exit(EXIT_TERMINATED)
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
    nproc = args.nproc_per_node
    if not (nproc.isdigit() and int(nproc) >= 1) and nproc not in ("auto", "cpu", "gpu", "xpu"):
        print(f"error: --nproc_per_node={nproc}: give the number of worker processes per node (1 or more), or "
              "auto, cpu or gpu (run_train.sh sets it from NGPU)", file=sys.stderr)
        return 1
    # The workers' death signal follows the thread that forks them (see the module doc).
    assert threading.current_thread() is threading.main_thread(), "savepoint.launch must run in the main thread"
    forward_sigterm_to_workers(args)
    die_with_launcher(args)
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode if failure.exitcode and failure.exitcode > 0 else 1
        shown = str(getattr(args, "local_ranks_filter", "") or "")
        hidden = shown and str(failure.local_rank) not in shown.split(",")
        where = (f"its output is not shown here (LOG_RANK={shown}): rerun with LOG_RANK={shown},{failure.local_rank} "
                 "to see its error" if hidden else "its error is above")
        print(f"savepoint: rank {rank} failed with exit code {failure.exitcode}; {where} "
              f"(rerun with SAVEPOINT_DEBUG=1 for a traceback)", file=sys.stderr)
        return code
    except RendezvousConnectionError:
        # Another node's job failed and the node hosting the rendezvous store (node_rank 0) exited:
        # this node's launcher can no longer reach it. Its workers die with it (die_with_launcher).
        print(f"savepoint: lost the connection to the job's rendezvous store at {args.rdzv_endpoint or 'localhost'} "
              "(the node hosting it has exited, normally because the job failed there: its output names the "
              "error); stopping this node's workers", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
