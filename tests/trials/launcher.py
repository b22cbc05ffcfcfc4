"""Kill trials of the launcher (``--target launcher``): SIGKILL torchrun, as ``./run_train.sh`` runs it.

Each job runs as a user runs it: ``python -m savepoint.launch`` (what ``./run_train.sh`` execs)
starting its workers with torchrun. A trial SIGKILLs the launcher alone (``kill -9 PID``, the OOM
killer) or its whole process group (a terminal, ``kill -9 -PGID``, a batch system without
cgroups), alternating. torchrun puts each worker in a session of its own, so neither kill reaches
the workers by itself. Then every process of the job (the launcher, its workers, their writer
processes and the processes they started) must be gone within ``SURVIVOR_GRACE_S``, and the
restart, started at once, must succeed and resume from the newest committed step.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from tests.trials.common import ROOT
from tests.trials.folder import classify_phase
from tests.trials.job import (
    RUN_TIMEOUT_S,
    JobSpec,
    Reference,
    TrialResult,
    checkpoint_root,
    memory_folder,
    reference_losses,
)

SURVIVOR_GRACE_S = 2.0
LAUNCHER_KILLS = ("pid", "group")


def launcher_command(spec: JobSpec, dump: Path) -> list[str]:
    """The command ``./run_train.sh`` execs (NGPU = the world size), training ``spec`` in ``dump``."""
    return [sys.executable, "-m", "savepoint.launch", f"--nproc_per_node={spec.world_size}", "--rdzv_backend",
            "c10d", "--rdzv_endpoint=localhost:0", "--max-restarts", str(spec.max_restarts), "--local-ranks-filter",
            "0", "--role", "rank", "--tee", "3", "-m", "savepoint", "train", *spec.argv(dump)]


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, session id) of a process, None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, session, ...
    return fields[0], int(fields[1]), int(fields[3])


def job_processes(launcher_pid: int, dump: Path) -> dict[int, str]:
    """The live processes of the job a launcher started: pid -> command line (zombies are dead).

    Found without help from the code under test: the launcher's own session (it starts one), every
    process whose command line names the job's dump folder (the workers), every process in a
    worker's session (torchrun starts each worker in its own; its writer process and the processes it
    starts stay in it), and every process that inherited ``SAVEPOINT_LAUNCHER_PID`` of this launcher.
    """
    marker = f"SAVEPOINT_LAUNCHER_PID={launcher_pid}\0".encode()
    needle = f"{dump}{os.sep}".encode(), str(dump).encode() + b"\0"
    table: dict[int, tuple[str, int, bytes]] = {}
    workers: set[int] = set()
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        stat = _proc_stat(pid)
        if stat is None or stat[0] in ("Z", "X"):
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes() + b"\0"
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        table[pid] = (stat[0], stat[2], cmdline)
        if any(n in cmdline for n in needle) or b"\0" + marker in b"\0" + environ:
            workers.add(pid)
    members = {pid for pid, (_, sid, _) in table.items()
               if pid == launcher_pid or sid == launcher_pid or pid in workers or sid in workers}
    return {pid: table[pid][2].replace(b"\0", b" ").decode(errors="replace").strip()[:300] for pid in members}


@dataclass
class LauncherRun:
    """One job started through the launcher, in a session of its own."""

    run_id: int
    proc: subprocess.Popen
    dump: Path
    started: float

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, timeout: float) -> bool:
        try:
            self.proc.wait(timeout=max(timeout, 0.0))
            return True
        except subprocess.TimeoutExpired:
            return False

    def output(self) -> str:
        return "".join((self.dump / f"run{self.run_id}.{s}").read_text(errors="replace") for s in ("out", "err"))


def start_launcher_run(spec: JobSpec, dump: Path, run_id: int) -> LauncherRun:
    dump.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("SAVEPOINT_DEBUG", None)
    with open(dump / f"run{run_id}.out", "wb") as out, open(dump / f"run{run_id}.err", "wb") as err:
        proc = subprocess.Popen(launcher_command(spec, dump), cwd=ROOT, env=env, stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return LauncherRun(run_id, proc, dump, time.monotonic())


def _metrics_started(dump: Path, offset: int) -> bool:
    path = dump / "metrics.jsonl"
    try:
        return path.stat().st_size > offset
    except OSError:
        return False


def launcher_run_until(run: LauncherRun, delay: float, ref: Reference, offset: int) -> bool:
    """Like ``forked.run_until``, the start-up part ending at the run's first metrics record; True if it exited
    first."""
    if delay < ref.startup_s:
        return run.wait(delay)
    while not _metrics_started(run.dump, offset):
        if run.wait(0.005):
            return True
        if time.monotonic() - run.started > RUN_TIMEOUT_S:
            return False
    training_from = time.monotonic()
    return run.wait(training_from + (delay - ref.startup_s) - time.monotonic())


def wait_observing(run: LauncherRun, offset: int, timeout: float) -> tuple[bool, float | None]:
    """Wait until the run exits or ``timeout``; returns (exited, seconds until its first metrics record)."""
    first = None
    while not run.wait(0.005):
        if first is None and _metrics_started(run.dump, offset):
            first = time.monotonic() - run.started
        if time.monotonic() - run.started > timeout:
            return False, first
    return True, first


def _resumed_from(output: str) -> int | None:
    """The step a finished launcher run trained from ("training ... from step N to M"), None if not logged."""
    found = re.findall(r"training \S+ \(\S+\) from step (\d+) to (\d+)", output)
    return int(found[-1][0]) if found else None


def kill_launcher(run: LauncherRun, how: str) -> None:
    """SIGKILL the launcher (``pid``) or its process group (``group``) and reap the launcher."""
    try:
        if how == "group":
            os.killpg(run.pid, signal.SIGKILL)
        else:
            os.kill(run.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    run.proc.wait()


def wait_for_survivors(run: LauncherRun, grace: float) -> tuple[dict[int, str], float]:
    """Poll the job's processes until none is left or ``grace`` passed; returns (survivors, seconds until gone)."""
    killed = time.monotonic()
    while True:
        left = job_processes(run.pid, run.dump)
        waited = time.monotonic() - killed
        if not left:
            return {}, waited
        if waited > grace:
            return left, waited
        time.sleep(0.01)


def reap_survivors(run: LauncherRun) -> None:
    """SIGKILL what is left of a killed job (survivors are reported first) and wait until it is gone."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = job_processes(run.pid, run.dump)
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)


def launcher_reference_run(spec: JobSpec, workdir: Path) -> Reference:
    """One uninterrupted launcher run: the losses every launcher trial must reproduce, and its timeline."""
    dump = Path(tempfile.mkdtemp(prefix=f"ref-launcher-{spec.mode}-", dir=workdir))
    try:
        run = start_launcher_run(spec, dump, 0)
        exited, first_metrics = wait_observing(run, 0, RUN_TIMEOUT_S)
        if not exited:
            kill_launcher(run, "group")
            reap_survivors(run)
            raise RuntimeError(f"launcher reference run ({spec.mode}) hung: {run.output()[-2000:]}")
        wall = time.monotonic() - run.started
        if run.proc.returncode != 0:
            raise RuntimeError(f"launcher reference run ({spec.mode}) exited {run.proc.returncode}: "
                               f"{run.output()[-3000:]}")
        losses = reference_losses(spec, dump, "launcher reference run")
        return Reference(losses, wall, first_metrics or wall / 2, spec.steps)
    finally:
        shutil.rmtree(dump, ignore_errors=True)
        shutil.rmtree(memory_folder(dump), ignore_errors=True)


def _kill_and_watch(result: TrialResult, run: LauncherRun, root: Path, segment: int, how: str) -> str:
    """SIGKILL the launcher (``how``); record how long the job took to go and report survivors; the phase hit."""
    kill_launcher(run, how)
    phase = classify_phase(root, run.dump)
    left, gone_s = wait_for_survivors(run, SURVIVOR_GRACE_S)
    result.launcher_kills.append({"how": how, "phase": phase, "survivors": len(left), "gone_s": round(gone_s, 3)})
    if left:
        result.fail("survivor", f"kill {segment + 1} ({how}, {phase}): {len(left)} process(es) of the job alive "
                                f"{SURVIVOR_GRACE_S:.0f} s after the kill: "
                                + "; ".join(f"{p} {c}" for p, c in sorted(left.items())))
    return phase


def _check_launcher_restart(result: TrialResult, run: LauncherRun, segment: int, records: list) -> None:
    """The restart trained from the newest step committed at the last kill (as its log says)."""
    expected = result.kills[-1][2]
    resumed = _resumed_from(run.output())
    if resumed is not None and resumed != (expected or 0):
        result.fail("wrong_step", f"run {segment}: trained from step {resumed}, newest committed was {expected}")
    else:
        result.check_first_step(records, segment)


def _check_launcher_exit(result: TrialResult, run: LauncherRun, segment: int) -> bool:
    """Record a restart's exit code; True if the run exited 0."""
    code = run.proc.returncode
    if segment > 0:
        result.restarts.append("ok" if code == 0 else f"exit {code}")
    if code != 0:
        tail = [ln for ln in run.output().splitlines() if "error" in ln.lower()][-3:]
        result.fail("unloadable", f"run {segment} exited {code}: {' | '.join(tail)[-1500:]}")
    return code == 0


def run_launcher_trial(trial: int, spec: JobSpec, ref: Reference, rng: random.Random, workdir: Path,
                       kills_per_trial: int = 1, keep_failed: bool = True) -> TrialResult:
    """``forked.run_trial`` for ``--target launcher``: SIGKILL the launcher (or its group) at random instants."""
    result = TrialResult.begin(trial, spec, workdir, "launcher-")
    dump = result.dump
    root = checkpoint_root(dump)
    offset = 0
    survivors: list[LauncherRun] = []
    try:
        for segment in range(kills_per_trial + 1):
            run = start_launcher_run(spec, dump, segment)
            killing = segment < kills_per_trial
            first_metrics = None
            if killing:
                delay = rng.uniform(0.0, ref.timeline_s())
                how = LAUNCHER_KILLS[rng.randrange(len(LAUNCHER_KILLS))]
                if launcher_run_until(run, delay, ref, offset):
                    result.completed_before_kill = True
                    killing = False
                else:
                    phase = _kill_and_watch(result, run, root, segment, how)
                    if result.launcher_kills[-1]["survivors"]:
                        survivors.append(run)  # left running: the restart meets them, as it would in real life
            if not killing:
                exited, first_metrics = wait_observing(run, offset, RUN_TIMEOUT_S)
                if not exited:
                    kill_launcher(run, "group")
                    reap_survivors(run)
                    result.fail("unloadable", f"run {segment} hung for {RUN_TIMEOUT_S:.0f} s")
                    break
            records, offset = result.check_losses(dump, offset, ref, segment)
            if segment > 0:
                _check_launcher_restart(result, run, segment, records)
            if killing:
                result.check_after_kill(root, segment, delay, phase)  # the job is gone (or survivors reported)
                continue
            if not _check_launcher_exit(result, run, segment):
                break
            if first_metrics is not None:
                ref.startups.append(first_metrics)
            result.check_finished(root, spec)
            break
    except Exception as e:  # noqa: BLE001 - a harness failure is reported, not hidden
        result.fail("harness", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    finally:
        for run in survivors:
            reap_survivors(run)
    return result.close(keep_failed)
