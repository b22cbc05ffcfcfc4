"""Kill trials of one worker (``--target worker``): SIGKILL one rank of a job that torchrun restarts.

The job runs as ``./run_train.sh`` runs it with ``MAX_RESTARTS`` set: ``python -m savepoint.launch
--max-restarts N``. At an instant drawn over the reference run's timeline, the trial SIGKILLs one
worker (a random rank; the launcher and the other workers are left alone), as the OOM killer or a
crash would. torchrun then stops the other workers and starts a new group, which resumes by itself.
The trial checks, without help from the code under test:

a. the job finishes by itself with exit status 0, and the launcher said which rank failed and that
   it restarts every worker;
b. the restarted group trained from the newest step that was complete once the failed group was
   gone: the newest committed durable step, or with ``--memory-interval`` the newest in-memory step
   every rank holds when that is newer (and then the log says it loaded the in-memory checkpoint);
c. every loss logged (by the killed group and by the restarted one) is bit-identical to the
   uninterrupted reference run's, and every step was logged;
d. the folder ends as an uninterrupted run leaves it (the newest ``keep_latest_k`` steps, each
   verifying, no leftovers), the in-memory tier is removed, and no process of the job is left.

It also measures what a restart costs: from the kill to the launcher's restart line (the failed
group stopped), and from the kill to the restarted group's first trained step.
"""

from __future__ import annotations

import os
import random
import re
import signal
import time
import traceback
from pathlib import Path

from tests.trials.folder import classify_phase, read_folder
from tests.trials.job import RUN_TIMEOUT_S, JobSpec, Reference, TrialResult, checkpoint_root, memory_folder
from tests.trials.launcher import (
    LauncherRun,
    _proc_stat,
    _resumed_from,
    job_processes,
    kill_launcher,
    launcher_run_until,
    reap_survivors,
    start_launcher_run,
)

RESTART_LINE = re.compile(r"savepoint: rank (\d+) failed \(([^)]*)\); restarting every worker "
                          r"\(restart (\d+) of (\d+)\)")
FROM_MEMORY = re.compile(r"from the in-memory checkpoint of step (\d+)")
WORKER_WAIT_S = 60.0  # the longest a kill waits for the workers to exist (the launcher starting them)


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """Global rank -> pid of the launcher's live workers (its children with RANK in their environment)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _proc_stat(int(entry))
        if stat is None or stat[1] != launcher_pid or stat[0] in ("Z", "X"):
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = [v[5:] for v in environ if v.startswith(b"RANK=")]
        if rank and rank[0].isdigit():
            found[int(rank[0])] = int(entry)
    return found


def kill_one_worker(run: LauncherRun, world_size: int, rng: random.Random) -> tuple[int, float] | None:
    """SIGKILL one worker (a random rank) once the launcher has started them all; (rank, when) or None if the job
    ended first."""
    rank = rng.randrange(world_size)
    deadline = time.monotonic() + WORKER_WAIT_S
    while time.monotonic() < deadline:
        pids = worker_pids(run.pid)
        if len(pids) == world_size:
            try:
                os.kill(pids[rank], signal.SIGKILL)
                return rank, time.monotonic()
            except ProcessLookupError:
                pass  # it just exited (the job may be ending): look again
        if run.wait(0.005):
            return None
    return None


def memory_resume(folder: Path, world_size: int) -> int | None:
    """The newest in-memory step every rank holds in the ``--checkpoint.memory_folder`` ``folder``
    (``<run>/rank-R/step-N`` with a manifest), None if none."""
    common: set[int] | None = None
    for rank in range(world_size):
        steps = set()
        for run_dir in folder.glob(f"*/rank-{rank}"):
            for step in run_dir.glob("step-*"):
                if step.name[5:].isdigit() and (step / "manifest.json").is_file():
                    steps.add(int(step.name[5:]))
        common = steps if common is None else common & steps
    return max(common) if common else None


def _output_tail(run: LauncherRun) -> str:
    lines = [ln for ln in run.output().splitlines() if not ln.startswith("[rank") or "error" in ln.lower()]
    return " | ".join(lines[-6:])[-1500:]


def _watch_restart(result: TrialResult, run: LauncherRun, spec: JobSpec, killed_at: float, segment: int) -> dict:
    """Wait for the launcher's restart line; then (the failed group is gone) read what the restart will load.

    Returns the kill's record: rank, phase, seconds to the restart line, and the step the restart must load.
    """
    seen = segment  # the restart lines of the earlier kills
    while True:
        found = RESTART_LINE.findall(run.output())
        if len(found) > seen:
            break
        if run.wait(0.01) or time.monotonic() - killed_at > RUN_TIMEOUT_S:
            result.fail("unloadable", f"kill {segment + 1}: no restart line; exit {run.proc.returncode}: "
                                      f"{_output_tail(run)}")
            return {}
    record = {"stopped_s": round(time.monotonic() - killed_at, 3)}
    root = checkpoint_root(run.dump)
    state = read_folder(root)
    if state.incomplete:
        result.fail("corrupt", f"after kill {segment + 1}: step(s) {state.incomplete} visible without .metadata")
    durable = state.expected_resume
    ram = memory_resume(memory_folder(run.dump), spec.world_size) if spec.memory_interval else None
    record["durable"], record["memory"] = durable, ram
    record["expected"] = ram if ram is not None and ram >= (durable or 0) else durable
    record["restart_of"] = found[-1][2:]
    return record


def _first_step_after(run: LauncherRun, offset: int, killed_at: float) -> float | None:
    """Seconds from the kill until the restarted group logs its first step (metrics.jsonl grows past
    ``offset``), None if the run ended first."""
    path = run.dump / "metrics.jsonl"
    while True:
        try:
            if path.stat().st_size > offset:
                return round(time.monotonic() - killed_at, 3)
        except OSError:
            pass
        if run.wait(0.01) or time.monotonic() - killed_at > RUN_TIMEOUT_S:
            return None


def _kill_segment(result: TrialResult, run: LauncherRun, spec: JobSpec, rng: random.Random, delay: float,
                  segment: int) -> bool:
    """One kill and the restart it causes; False if the job ended before the kill landed."""
    root = checkpoint_root(run.dump)
    killed = kill_one_worker(run, spec.world_size, rng)
    if killed is None:
        return False
    rank, killed_at = killed
    phase = classify_phase(root, run.dump)
    record = _watch_restart(result, run, spec, killed_at, segment)
    if not record:
        result.kills.append((delay, phase, None))
        return True
    metrics = run.dump / "metrics.jsonl"
    offset = metrics.stat().st_size if metrics.is_file() else 0
    record.update(how="worker", rank=rank, phase=phase, survivors=0, gone_s=record["stopped_s"],
                  first_step_s=_first_step_after(run, offset, killed_at))
    result.kills.append((delay, phase, record["expected"]))
    result.launcher_kills.append(record)
    return True


def _check_end(result: TrialResult, run: LauncherRun, spec: JobSpec, ref: Reference, kills: int) -> None:
    """The finished job: exit 0, the resume step, every loss bit-exact, the folder, RAM and processes clean."""
    output = run.output()
    code = run.proc.returncode
    result.restarts.append("ok" if code == 0 else f"exit {code}")
    if code != 0:
        result.fail("unloadable", f"the job exited {code} after {kills} worker kill(s): {_output_tail(run)}")
    records, _ = result.check_losses(run.dump, 0, ref, 0)
    logged = sorted({step for step, _ in records})
    if code == 0 and logged != list(range(1, spec.steps + 1)):
        result.fail("mismatch", f"logged steps {logged}, expected 1..{spec.steps}")
    if kills and result.launcher_kills:
        expected = result.launcher_kills[-1]["expected"]
        resumed = _resumed_from(output)
        if resumed is not None and resumed != (expected or 0):
            result.fail("wrong_step", f"the restart trained from step {resumed}, expected {expected} "
                                      f"({result.launcher_kills[-1]})")
        from_memory = [int(s) for s in FROM_MEMORY.findall(output)]
        if spec.memory_interval and expected is not None and expected == result.launcher_kills[-1]["memory"] and \
                expected != result.launcher_kills[-1]["durable"] and from_memory[-1:] != [expected]:
            result.fail("wrong_step", f"the restart did not say it loaded the in-memory checkpoint of step {expected}")
    if code == 0:
        result.check_finished(checkpoint_root(run.dump), spec)
        left = [p for p in memory_folder(run.dump).glob("*/rank-*")]
        if left:
            result.fail("leftover", f"the finished job left in-memory copies: {left}")
    survivors = job_processes(run.pid, run.dump)
    if survivors:
        result.fail("survivor", f"{len(survivors)} process(es) of the finished job alive: {survivors}")


def run_worker_trial(trial: int, spec: JobSpec, ref: Reference, rng: random.Random, workdir: Path,
                     kills_per_trial: int = 1, keep_failed: bool = True) -> TrialResult:
    """``forked.run_trial`` for ``--target worker``: SIGKILL one worker at a random instant, ``kills_per_trial``
    times (each after the previous restart), and let torchrun restart the job (``spec.max_restarts``)."""
    result = TrialResult.begin(trial, spec, workdir, "worker-")
    run = start_launcher_run(spec, result.dump, 0)
    kills = 0
    try:
        for segment in range(kills_per_trial):
            delay = rng.uniform(0.0, ref.timeline_s())
            ended = launcher_run_until(run, delay, ref, 0) if segment == 0 else run.wait(delay)
            if ended or not _kill_segment(result, run, spec, rng, delay, segment):
                result.completed_before_kill = True
                break
            kills += 1
            if result.outcome != "ok":
                break
        if not run.wait(RUN_TIMEOUT_S - (time.monotonic() - run.started)):
            result.fail("unloadable", f"the job hung for {RUN_TIMEOUT_S:.0f} s: {_output_tail(run)}")
            kill_launcher(run, "group")
        _check_end(result, run, spec, ref, kills)
    except Exception as e:  # noqa: BLE001 - a harness failure is reported, not hidden
        result.fail("harness", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    finally:
        if run.proc.poll() is None:
            kill_launcher(run, "group")
        reap_survivors(run)
    return result.close(keep_failed)
