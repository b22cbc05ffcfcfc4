"""Processes that die with the process that started them, however it dies.

A training job is a tree: the launcher (torchrun, ``savepoint.launch``), its workers (one per
rank), and each worker's checkpoint writer process (``async_with_pinned_mem``). torchrun starts
each worker in a session of its own, so a SIGKILL of the launcher, or of its process group, reaches
no worker; and nothing stops a writer whose worker died. Left running, they train on, write into
the checkpoint folder, hold its lock (so the restart fails) or wait in a collective for half an
hour. Two mechanisms end them:

- The kernel's death signal (``prctl(PR_SET_PDEATHSIG, SIGKILL)``): the process is SIGKILLed the
  moment its parent goes, with no code of its own having to run. It follows the parent *thread*
  that forked the process, so it suits a parent that forks from a thread living as long as itself.
  Arming it leaves a window (the parent may have died already), closed by checking ``getppid()``
  right after.
- A watch on the parent's multiprocessing sentinel (a pipe whose other end dies with the parent),
  for children forked from a short-lived thread.

Workers: the launcher runs this file (``python -I -S lifeline.py LAUNCHER_PID COMMAND...``) as each
worker's first program: it arms the death signal, checks the launcher is still its parent, and
execs the worker command (same pid; the death signal survives exec). torchrun forks workers in its
main thread. Writers: DCP forks the writer process from a thread that lives until the writer has
started (it waits for its "init complete"), then exits after the save; so the writer arms the death
signal as the first thing it unpickles (``WriterTarget``), before its heavy imports, and swaps it
for the sentinel watch once running (``_run_writer``).

This module imports only the standard library (torch is imported where needed): the writer's
start-up imports it before anything else, and the worker wrapper runs it with ``-I -S``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from typing import Any

PR_SET_PDEATHSIG = 1


def set_death_signal(sig: int) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent thread exits (0 disarms); False if unsupported."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (AttributeError, OSError):  # not Linux
        return False


def die_with_parent(parent_pid: int) -> bool:
    """SIGKILL this process when its parent dies; exits at once if ``parent_pid`` is no longer its parent.

    Returns False where the kernel offers no death signal (then nothing is armed).
    """
    if not set_death_signal(signal.SIGKILL):
        return False
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
    return True


def watch_parent_sentinel() -> bool:
    """In a multiprocessing child: SIGKILL this process once its parent dies (a daemon thread waits on
    the parent's sentinel, which becomes readable then). False if there is no sentinel."""
    import multiprocessing
    import multiprocessing.connection

    parent = multiprocessing.parent_process()
    sentinel = getattr(parent, "sentinel", None)
    if sentinel is None:
        return False

    def watch() -> None:
        multiprocessing.connection.wait([sentinel])
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="savepoint-parent-watch", daemon=True).start()
    return True


# ---- the writer process --------------------------------------------------------------------------


class WriterTarget:
    """Stands in for DCP's writer-process body (``_AsyncCheckpointProcess._checkpointing_subprocess``).

    multiprocessing "spawn" pickles the target; this one pickles as a call to ``_writer_started``
    with the trainer's pid, which the new process makes while unpickling it: before the arguments
    that import torch (seconds on a busy machine) are read.
    """

    def __init__(self, body: Any):
        self.body = body

    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # run in this process (not through spawn)
        return self.body(*args, **kwargs)

    def __reduce__(self) -> tuple:
        return _writer_started, (os.getpid(),)


def _writer_started(trainer_pid: int) -> Any:
    """In the new writer process, while its target is unpickled: die with the trainer from now on."""
    die_with_parent(trainer_pid)
    return _run_writer


def _run_writer(*args: Any, **kwargs: Any) -> Any:
    """The writer process's body: watch the trainer through its sentinel, then run DCP's body.

    The death signal armed at start-up follows DCP's forking thread, which waits for the writer's
    "init complete" and then ends: so the sentinel watch takes over before the signal is disarmed.
    """
    watch_parent_sentinel()
    set_death_signal(0)
    from torch.distributed.checkpoint import _async_process_executor as executor

    body = executor._AsyncCheckpointProcess.__dict__["_checkpointing_subprocess"]  # this process never replaced it
    body = body.__func__ if isinstance(body, staticmethod) else body
    if isinstance(body, WriterTarget):
        body = body.body
    return body(*args, **kwargs)


def writer_process_dies_with_trainer() -> bool:
    """Make DCP start its writer process through ``WriterTarget`` (once per process); False if this torch
    has no such hook (then a writer process may outlive a killed trainer)."""
    try:
        from torch.distributed.checkpoint import _async_process_executor as executor
        cls = executor._AsyncCheckpointProcess
        body = cls.__dict__["_checkpointing_subprocess"]
    except (ImportError, AttributeError, KeyError):
        return False
    if not isinstance(body, WriterTarget):
        cls._checkpointing_subprocess = WriterTarget(body.__func__ if isinstance(body, staticmethod) else body)
    return True


# ---- the worker wrapper --------------------------------------------------------------------------


def exec_worker(argv: list[str]) -> None:
    """``lifeline.py LAUNCHER_PID COMMAND...``: die with the launcher, then exec COMMAND (keeping this pid)."""
    launcher_pid, command = int(argv[0]), argv[1:]
    if not die_with_parent(launcher_pid):
        print("savepoint: warning: this worker cannot be tied to its launcher here (no prctl): if the launcher "
              "is killed, stop the workers yourself", file=sys.stderr, flush=True)
    os.execvp(command[0], command)


if __name__ == "__main__":
    exec_worker(sys.argv[1:])
