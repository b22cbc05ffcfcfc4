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

Restarts (``--max-restarts N``, ``MAX_RESTARTS`` of ``./run_train.sh``): when a worker fails,
torchrun sends SIGTERM to every other worker's process group (their writer processes included),
SIGKILLs what is left after 30 s, and starts a new worker group, which resumes from the newest
checkpoint. This launcher prints one line saying which rank failed and which restart this is
(``restarting_workers``); after a SIGTERM (a preemption: the node is going away) it restarts
nothing, so a worker that failed to save then ends the job. torchrun keeps one TCPStore server
for the workers' process group across restarts and the workers' keys in it carry no restart
number, so the new workers would find the dead group's gloo or NCCL addresses: they fail to
connect, or wait for them until ``comm.init_timeout_seconds`` runs out. So the launcher gives each
worker group a fresh store (``fresh_worker_store_every_round``).

Several nodes (``--nnodes N``, ``NNODES`` of ``./run_train.sh``): with the c10d rendezvous, torchrun
ignores ``--node_rank`` and numbers the nodes by sorting their host names and launcher pids, so
global rank 0 (the one that logs, writes the metrics and commits checkpoints) could run on any
node. This launcher numbers them by ``--node_rank`` (``number_nodes_by_node_rank``): node k runs
the global ranks k*nproc_per_node to (k+1)*nproc_per_node-1, as with torchrun's static rendezvous.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (
    DynamicRendezvousHandler,
    _NodeDesc,
    _NodeDescGenerator,
)
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


# Set once SIGTERM came: the job is being preempted, and a worker failing now is not restarted.
PREEMPTED = threading.Event()
RESTARTS = [0]  # how many times this launcher restarted a failed worker group
# Set once this launcher reached the rendezvous store: a connection error after it means the store's node left.
JOINED = threading.Event()


def _forward_sigterm(signum: int, frame: FrameType | None) -> None:
    PREEMPTED.set()
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


def first_failure(failures: dict[int, ProcessFailure]) -> tuple[int, ProcessFailure]:
    """(global rank, failure) of the worker that failed first.

    torchrun stamps a failure with whole seconds, and records the workers it stopped itself (SIGTERM)
    and those that failed because a peer died as failures too: within the same second, one killed by
    another signal (SIGKILL: the OOM killer, a crash) comes first, then one that exited non-zero.
    """
    def key(item: tuple[int, ProcessFailure]) -> tuple[int, int, int]:
        rank, failure = item
        code = failure.exitcode
        order = 0 if code < 0 and -code != signal.SIGTERM else 2 if code == -signal.SIGTERM else 1
        return failure.timestamp, order, rank
    return min(failures.items(), key=key)


def describe_exit(failure: ProcessFailure) -> str:
    """``exit code 3`` or ``killed by SIGKILL``."""
    code = failure.exitcode
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def restarting_workers(agent: LocalElasticAgent, failures: dict[int, ProcessFailure]) -> str:
    """The line printed when a failed worker group is restarted."""
    spec = agent.get_worker_group().spec
    restart = spec.max_restarts - agent._remaining_restarts  # already counted down for this restart
    if not failures:
        return f"savepoint: the workers failed; restarting every worker (restart {restart} of " \
               f"{spec.max_restarts}); they resume from the newest checkpoint"
    rank, failure = first_failure(failures)
    return (f"savepoint: rank {rank} failed ({describe_exit(failure)}); restarting every worker (restart {restart} "
            f"of {spec.max_restarts}); they resume from the newest checkpoint")


def announce_restarts() -> None:
    """Make torchrun's agent print ``restarting_workers`` before it restarts a failed worker group (once per
    process). A restart because another node joined is not a failure: it prints nothing. After SIGTERM (a
    preemption) a failed worker group is not restarted: the job ends with its failure."""
    if getattr(LocalElasticAgent._restart_workers, "savepoint_wrapped", False):
        return
    monitor, restart = LocalElasticAgent._monitor_workers, LocalElasticAgent._restart_workers

    def _monitor_workers(self: LocalElasticAgent, worker_group):
        result = monitor(self, worker_group)
        self.savepoint_last_failures = result.failures
        if PREEMPTED.is_set() and result.failures:
            self._remaining_restarts = 0  # preempted: the node is going away; a restart would only be killed
        return result

    def _restart_workers(self: LocalElasticAgent, worker_group) -> None:
        from torch.distributed.elastic.agent.server.api import WorkerState
        if worker_group.state in (WorkerState.FAILED, WorkerState.UNHEALTHY):
            print(restarting_workers(self, getattr(self, "savepoint_last_failures", {})), file=sys.stderr,
                  flush=True)
            RESTARTS[0] += 1
        restart(self, worker_group)

    _restart_workers.savepoint_wrapped = True  # type: ignore[attr-defined]
    LocalElasticAgent._monitor_workers = _monitor_workers  # type: ignore[method-assign]
    LocalElasticAgent._restart_workers = _restart_workers  # type: ignore[method-assign]


def fresh_worker_store_every_round() -> None:
    """Give every worker group a TCPStore server of its own (once per process; see the module doc).

    ``DynamicRendezvousHandler`` (``--rdzv_backend c10d``) starts the workers' store on the first
    rendezvous and hands the same one to every later group; forgetting it before the next round
    makes node rank 0 start a new one (on a new port, which the other nodes read from the round's
    rendezvous keys). The old server goes with the dead group.
    """
    original = DynamicRendezvousHandler.next_rendezvous
    if getattr(original, "savepoint_wrapped", False):
        return

    def next_rendezvous(self: DynamicRendezvousHandler):
        JOINED.set()  # the rendezvous store was reached (or is hosted here)
        if getattr(self, "_bootstrap_store_info", None) is not None and hasattr(self, "_shared_tcp_store_server"):
            self._shared_tcp_store_server = None
            self._bootstrap_store_info = None
        return original(self)

    next_rendezvous.savepoint_wrapped = True  # type: ignore[attr-defined]
    DynamicRendezvousHandler.next_rendezvous = next_rendezvous  # type: ignore[method-assign]


@dataclass(eq=True, order=False, frozen=True, repr=False)
class RankedNode(_NodeDesc):
    """A rendezvous participant that sorts by its ``--node_rank`` first (the rendezvous numbers nodes in sorted
    order). Every node's launcher is this module, so each one can unpickle the others' descriptors."""

    node_rank: int = 0

    def __lt__(self, other: _NodeDesc) -> bool:
        def key(node: _NodeDesc) -> tuple[int, str, int, int]:
            return getattr(node, "node_rank", 0), node.addr, node.pid, node.local_id
        return key(self) < key(other)


class _RankedNodes(_NodeDescGenerator):
    def __init__(self, node_rank: int) -> None:
        super().__init__()
        self.node_rank = node_rank

    def generate(self, local_addr: str | None = None) -> _NodeDesc:
        node = super().generate(local_addr)
        return RankedNode(node.addr, node.pid, node.local_id, self.node_rank)


def number_nodes_by_node_rank(args: Namespace) -> None:
    """Make the c10d rendezvous give this node the group rank ``--node_rank`` (see the module doc)."""
    if args.rdzv_backend == "static":
        return  # torchrun's static rendezvous uses --node_rank itself
    DynamicRendezvousHandler._node_desc_generator = _RankedNodes(int(args.node_rank))
    args.node_rank = 0  # not ignored any more: spare torchrun's warning that it is


def failed_summary(args: Namespace, rank: int, failure: ProcessFailure) -> str:
    """The launcher's last line when the job failed (and no restart is left)."""
    after = ""
    if RESTARTS[0]:
        most = ", the most --max-restarts allows" if RESTARTS[0] >= args.max_restarts else ""
        after = f" after {RESTARTS[0]} restart(s){most}"
    if PREEMPTED.is_set() and args.max_restarts:
        after += " (after SIGTERM, so not restarted)"
    if failure.exitcode < 0:  # killed by a signal: the process could print nothing
        oom = " (often the kernel's out-of-memory killer: see dmesg)" if -failure.exitcode == signal.SIGKILL else ""
        return f"savepoint: rank {rank} failed: {describe_exit(failure)}{oom}{after}"
    shown = str(getattr(args, "local_ranks_filter", "") or "")
    hidden = shown and str(failure.local_rank) not in shown.split(",")
    where = (f"its output is not shown here (LOG_RANK={shown}): rerun with LOG_RANK={shown},{failure.local_rank} "
             "to see its error" if hidden else "its error is above")
    return (f"savepoint: rank {rank} failed with exit code {failure.exitcode}{after}; {where} "
            "(rerun with SAVEPOINT_DEBUG=1 for a traceback)")


def rendezvous_failed(args: Namespace, error: RendezvousConnectionError) -> str:
    """The launcher's last line when it cannot host, reach, or no longer reaches the rendezvous store."""
    endpoint = args.rdzv_endpoint or "localhost"
    cause = str(error.__cause__ or error).splitlines()[0].rstrip(".")
    if "EADDRINUSE" in cause:
        return (f"error: cannot host the job's rendezvous at {endpoint}: the port is in use on this node (another "
                "job, or another node started as node 0 here); give a free port (MASTER_PORT of run_train.sh), the "
                "same on every node, and one node 0 (NODE_RANK=0)")
    if not JOINED.is_set():
        return (f"error: cannot reach the job's rendezvous at {endpoint} ({cause}): start node 0 (NODE_RANK=0 of "
                "run_train.sh) on that host, and give every node its address and port (MASTER_ADDR, MASTER_PORT)")
    # Another node's job failed and the node hosting the rendezvous store (node rank 0) exited:
    # this node's launcher can no longer reach it. Its workers die with it (die_with_launcher).
    return (f"savepoint: lost the connection to the job's rendezvous store at {endpoint} (the node hosting it has "
            "exited, normally because the job failed there: its output names the error); stopping this node's "
            "workers")


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
    announce_restarts()
    fresh_worker_store_every_round()
    number_nodes_by_node_rank(args)
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = first_failure(e.failures) if e.failures else e.get_first_failure()
        code = failure.exitcode if failure.exitcode and failure.exitcode > 0 else 1
        print(failed_summary(args, rank, failure), file=sys.stderr)
        return code
    except RendezvousConnectionError as e:
        print(rendezvous_failed(args, e), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Run as savepoint.launch, not __main__: the other nodes unpickle RankedNode from that module.
    from savepoint import launch as _launch
    sys.exit(_launch.main(sys.argv[1:]))
