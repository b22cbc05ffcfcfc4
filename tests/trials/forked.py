"""Kill trials of forked ranks (``--target job``): SIGKILL the job's process group at a random instant.

The harness process imports torch and savepoint once and forks one child per rank of a run (no
torch compute runs in the parent before a fork, so the children start with a clean thread pool).
World size 2 forks two ranks, which join a gloo process group by environment variables
(``MASTER_ADDR``/``MASTER_PORT`` on a free port, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and share
one process group id, so one ``killpg`` kills the whole job: trainer ranks, writer threads and
writer processes.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Imported once in the harness process, before any fork. Nothing here runs torch compute.
import torch

from savepoint.job import parse_args
from savepoint.train import Trainer
from tests.trials.folder import classify_phase
from tests.trials.job import RUN_TIMEOUT_S, JobSpec, Reference, TrialResult, checkpoint_root, reference_losses


def _child_main(spec: JobSpec, dump: Path, run_id: int, rank: int, port: int | None, pgid: int) -> None:
    """Body of a forked child: one rank of one run. Never returns."""
    code = 1
    try:
        try:
            os.setpgid(0, pgid or 0)
        except OSError:
            pass  # the parent set it already
        if spec.world_size > 1:
            os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                               "LOCAL_RANK": str(rank), "WORLD_SIZE": str(spec.world_size),
                               "LOCAL_WORLD_SIZE": str(spec.world_size)})
        warnings.filterwarnings("ignore")
        torch.set_num_threads(1)
        _log_to(dump / f"run{run_id}.rank{rank}.log")
        trainer = Trainer(parse_args(spec.argv(dump), environ={}))
        loaded = trainer.load_checkpoint()
        if rank == 0:
            _write_json(dump / f"run{run_id}.loaded.json", {"loaded": loaded, "t": time.monotonic()})
        trainer.train()
        trainer.checkpointer.close()
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        code = 0
    except BaseException:
        try:
            (dump / f"run{run_id}.rank{rank}.error").write_text(traceback.format_exc())
        except OSError:
            pass
    finally:
        logging.shutdown()
        os._exit(code)


def _log_to(path: Path) -> None:
    """Send the ``savepoint`` log (INFO and up) of this rank to ``path`` only."""
    log = logging.getLogger("savepoint")
    for handler in list(log.handlers):
        log.removeHandler(handler)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s",
                                           datefmt="%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Run:
    """One started run: its ranks (forked children) in one process group."""

    run_id: int
    pids: list[int]
    pgid: int
    started: float
    status: dict[int, int] = field(default_factory=dict)  # pid -> wait status
    ended: float | None = None  # when the last rank was reaped

    def poll(self) -> bool:
        """Reap ranks that exited; True when all have."""
        for pid in self.pids:
            if pid in self.status:
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                self.status[pid] = status
        if len(self.status) == len(self.pids):
            self.ended = self.ended or time.monotonic()
            return True
        return False

    def wait(self, timeout: float) -> bool:
        """Wait until every rank exited, or ``timeout``; True if they did."""
        deadline = time.monotonic() + timeout
        delay = 0.001
        while not self.poll():
            if time.monotonic() > deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
        return True

    def kill(self) -> None:
        """SIGKILL the whole job (every process in its group) and reap the ranks."""
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in self.pids:
            if pid not in self.status:
                self.status[pid] = os.waitpid(pid, 0)[1]
        # Writer processes the ranks started are in the group too; they were killed with it and are
        # reaped by init. Wait until the group is empty so the next run never races with them.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.killpg(self.pgid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.002)

    def exit_codes(self) -> list[int | None]:
        return [os.waitstatus_to_exitcode(self.status[p]) if p in self.status else None for p in self.pids]

    def ok(self) -> bool:
        return len(self.status) == len(self.pids) and all(c == 0 for c in self.exit_codes())


def start_run(spec: JobSpec, dump: Path, run_id: int) -> Run:
    """Fork the ranks of one run; they train ``spec`` in ``dump`` (auto-resuming) to the end."""
    dump.mkdir(parents=True, exist_ok=True)
    port = _free_port() if spec.world_size > 1 else None
    pids: list[int] = []
    pgid = 0
    sys.stdout.flush()
    sys.stderr.flush()
    for rank in range(spec.world_size):
        pid = os.fork()
        if pid == 0:
            _child_main(spec, dump, run_id, rank, port, pgid)
        if pgid == 0:
            pgid = pid
        try:
            os.setpgid(pid, pgid)
        except OSError:
            pass  # the child set it already (or has exited)
        pids.append(pid)
    return Run(run_id, pids, pgid, time.monotonic())


def run_error(dump: Path, run_id: int) -> str:
    msgs = [p.read_text().strip().splitlines()[-1] for p in sorted(dump.glob(f"run{run_id}.rank*.error"))]
    return "; ".join(msgs) or "no error file"


def run_until(run: Run, dump: Path, delay: float, ref: Reference) -> bool:
    """Let ``run`` go on until the instant ``delay`` of the reference run's timeline; True if it exited first.

    The timeline has two parts (see ``Reference``): start-up (fork until the checkpoint was looked
    for and loaded) and training (from there to exit). A delay within the
    start-up part is waited from the fork; a later one from the moment this run reports it loaded.
    So kills stay uniform over the phases of the run even when start-up is slower than it was for
    the reference (a loaded machine), instead of piling up in start-up.
    """
    if delay < ref.startup_s:
        return run.wait(delay)
    loaded_file = dump / f"run{run.run_id}.loaded.json"
    while not loaded_file.is_file():
        if run.wait(0.002):
            return True
        if time.monotonic() - run.started > RUN_TIMEOUT_S:
            return False  # hung in start-up: kill it; the checks report what it left
    loaded_at = json.loads(loaded_file.read_text())["t"]
    remaining = loaded_at + (delay - ref.startup_s) - time.monotonic()
    return run.wait(max(remaining, 0.0))


def _loaded(dump: Path, run_id: int) -> Any:
    path = dump / f"run{run_id}.loaded.json"
    if not path.is_file():
        return "missing"
    return json.loads(path.read_text())["loaded"]


def reference_run(spec: JobSpec, workdir: Path) -> Reference:
    """One uninterrupted run: the losses every trial must reproduce, and the wall time kills span."""
    dump = Path(tempfile.mkdtemp(prefix=f"ref-{spec.mode}-", dir=workdir))
    try:
        run = start_run(spec, dump, 0)
        if not run.wait(RUN_TIMEOUT_S) or not run.ok():
            run.kill()
            raise RuntimeError(f"reference run ({spec.mode}) failed: {run_error(dump, 0)}")
        wall = time.monotonic() - run.started
        startup = json.loads((dump / "run0.loaded.json").read_text())["t"] - run.started
        return Reference(reference_losses(spec, dump, "reference run"), wall, startup, spec.steps)
    finally:
        shutil.rmtree(dump, ignore_errors=True)


def _check_restart(result: TrialResult, dump: Path, run_id: int, records: list, killed: bool) -> None:
    """A restart loaded the newest step committed at the last kill, and trained on from the step after it."""
    loaded = _loaded(dump, run_id)
    expected = result.kills[-1][2]
    if loaded == "missing":
        if not killed:  # a finished run must have written it; a killed one may not have yet
            result.fail("unloadable", f"run {run_id}: never got past loading ({run_error(dump, run_id)})")
    elif loaded != expected:
        result.fail("wrong_step", f"run {run_id}: loaded step {loaded}, newest committed was {expected}")
    else:
        result.check_first_step(records, run_id)


def run_trial(trial: int, spec: JobSpec, ref: Reference, rng: random.Random, workdir: Path,
              kills_per_trial: int = 1, keep_failed: bool = True) -> TrialResult:
    """Kill the job ``kills_per_trial`` times at random instants, then let it finish; check everything."""
    result = TrialResult.begin(trial, spec, workdir)
    dump = result.dump
    root = checkpoint_root(dump)
    offset = 0
    try:
        for run_id in range(kills_per_trial + 1):
            run = start_run(spec, dump, run_id)
            killing = run_id < kills_per_trial
            if killing:
                delay = rng.uniform(0.0, ref.timeline_s())
                if run_until(run, dump, delay, ref):
                    result.completed_before_kill = True
                    killing = False
                else:
                    run.kill()
            if not killing and not run.wait(RUN_TIMEOUT_S):
                run.kill()
                result.fail("unloadable", f"run {run_id} hung for {RUN_TIMEOUT_S:.0f} s")
                break
            # Losses the run logged (its own records only: the file is append-only across runs).
            records, offset = result.check_losses(dump, offset, ref, run_id)
            if run_id > 0:
                _check_restart(result, dump, run_id, records, killing)
            if killing:
                result.check_after_kill(root, run_id, delay, classify_phase(root, dump))
                continue
            if not run.ok():
                result.fail("unloadable", f"run {run_id} exited {run.exit_codes()}: {run_error(dump, run_id)}")
                break
            ref.observe(run, dump, None if run_id == 0 else _loaded(dump, run_id), finished=True)
            result.check_finished(root, spec)
            break
    except Exception as e:  # noqa: BLE001 - a harness failure is reported, not hidden
        result.fail("harness", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    return result.close(keep_failed)
