"""Automatic restarts: ``MAX_RESTARTS=N ./run_train.sh`` (torchrun's ``--max-restarts``), end to end.

A worker (not the launcher) is SIGKILLed mid-run, as the OOM killer would; torchrun stops the other
worker and starts a new group, which resumes from the newest checkpoint by itself: the job exits 0
and every loss it logged is bit-identical to an uninterrupted run's. With ``MAX_RESTARTS=0`` the
same kill fails the job with one summary line; a bad ``MAX_RESTARTS`` is refused before any process
starts. Two processes (gloo on CPU), the debug model.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.trials.folder import compare_losses, read_folder, read_losses, verify_folder
from tests.trials.restart import FROM_MEMORY, memory_resume, worker_pids

STEPS, INTERVAL = 10, 5  # durable saves at 5 and 10 (keep_latest_k 2 keeps both)
JOB = ["--training.seq_len", "16", "--training.local_batch_size", "1", "--training.steps", str(STEPS),
       "--lr_scheduler.warmup_steps", "2", "--checkpoint.enable", "--checkpoint.interval", str(INTERVAL),
       "--checkpoint.keep_latest_k", "2", "--checkpoint.no_last_save_model_only", "--metrics.log_freq", "1"]
TIMEOUT_S = 300


def _start(dump: Path, *args: str, ngpu: int = 2, max_restarts: str | None = None) -> subprocess.Popen:
    env = {"OMP_NUM_THREADS": "1", **os.environ, "SAVEPOINT_PYTHON": sys.executable, "NGPU": str(ngpu)}
    env.pop("MAX_RESTARTS", None)
    if max_restarts is not None:
        env["MAX_RESTARTS"] = max_restarts
    dump.mkdir(parents=True, exist_ok=True)
    with open(dump / "out.log", "wb") as out:
        return subprocess.Popen(["./run_train.sh", "--job.dump_folder", str(dump), *JOB, *args], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def _finish(proc: subprocess.Popen, dump: Path) -> str:
    try:
        proc.wait(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # its workers die with it
            proc.wait()
    return (dump / "out.log").read_text(errors="replace")


def _logged(dump: Path) -> list[int]:
    return [step for step, _ in read_losses(dump)[0]]


def _wait(condition, proc: subprocess.Popen, what: str) -> float:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert proc.poll() is None, f"the job exited {proc.returncode} before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    return time.monotonic()


def _kill_rank(proc: subprocess.Popen, rank: int) -> float:
    """SIGKILL one worker of the job (run_train.sh execs the launcher: ``proc`` is the launcher)."""
    pid = worker_pids(proc.pid)[rank]
    os.kill(pid, signal.SIGKILL)
    return time.monotonic()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    """The losses of an uninterrupted two-process run (MAX_RESTARTS unset)."""
    dump = tmp_path_factory.mktemp("restarts") / "reference"
    out = _finish(_start(dump), dump)
    records = dict(read_losses(dump)[0])
    assert sorted(records) == list(range(1, STEPS + 1)), out[-3000:]
    return records


@pytest.mark.parametrize(("memory_interval", "killed"), [(0, 0), (1, 1)], ids=["from-disk", "in-memory-tier"])
def test_a_killed_worker_is_restarted_and_the_job_finishes_bit_exact(tmp_path, reference, memory_interval, killed):
    """SIGKILL of one rank between the durable saves of steps 5 and 10: the job restarts every worker and
    finishes by itself. From disk it resumes from step 5 (the kill comes after step 7); with
    ``memory_interval 1`` from the newest in-memory step both ranks hold (the kill comes once both hold
    one of steps 6 to 9). Rank 0 (the one holding the folder lock) or rank 1 is killed."""
    dump, ram = tmp_path / "job", Path("/dev/shm") / f"savepoint-test-restarts-{os.getpid()}-{tmp_path.name}"
    memory = ["--checkpoint.memory_interval", str(memory_interval), "--checkpoint.memory_folder", str(ram)] \
        if memory_interval else []
    proc = _start(dump, *memory, max_restarts="1")
    try:
        # With the in-memory tier, the kill waits until both ranks hold a RAM step newer than the durable one.
        _wait((lambda: (memory_resume(ram, 2) or 0) > INTERVAL) if memory_interval else (lambda: 7 in _logged(dump)),
              proc, "the instant to kill")
        killed_at = _kill_rank(proc, killed)
        restart_line = f"savepoint: rank {killed} failed (killed by SIGKILL); restarting every worker (restart 1 of 1)"
        stopped = _wait(lambda: restart_line in (dump / "out.log").read_text(errors="replace"), proc, "the restart")
        expected = memory_resume(ram, 2) if memory_interval else None
        expected = expected if expected is not None and expected > INTERVAL else INTERVAL
        offset = (dump / "metrics.jsonl").stat().st_size
        first = _wait(lambda: (dump / "metrics.jsonl").stat().st_size > offset, proc, "the first step after it")
        out = _finish(proc, dump)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(ram, ignore_errors=True)
    print(f"\nrestart ({'memory' if memory_interval else 'disk'}): failed group stopped "
          f"{stopped - killed_at:.2f} s after the kill, first step {first - killed_at:.2f} s after it")
    assert proc.returncode == 0, out[-4000:]
    assert f"{restart_line}; they resume from the newest checkpoint" in out.splitlines(), out[-3000:]
    assert f"from step {expected} to {STEPS}" in out, out[-3000:]
    if memory_interval:
        assert expected > INTERVAL, f"both ranks held an in-memory step newer than {INTERVAL} when one was killed"
        assert FROM_MEMORY.findall(out) == [str(expected)], out[-3000:]
        # Rank 0 survived rank 1 (its output is shown, unless torchrun stopped showing it first): at most the
        # one line "error: another rank of the job is gone ...", never gloo's traceback.
        assert "Traceback" not in out, out.split("restarting every worker")[0][-3000:]
    else:
        assert not FROM_MEMORY.findall(out)
    records, _ = read_losses(dump)
    assert compare_losses(records, reference) == [] and sorted({s for s, _ in records}) == list(range(1, STEPS + 1))
    assert [s for s, _ in records].count(expected + 1) == 2  # trained before the kill and again after it
    state = read_folder(dump / "checkpoint")
    assert state.committed == [INTERVAL, STEPS] and not state.hidden and not state.incomplete, state
    assert verify_folder(dump / "checkpoint", state) == []
    assert not list(ram.glob("*/rank-*")), "the finished job removes its in-memory copies"


def test_without_restarts_a_killed_worker_fails_the_job_with_one_line(tmp_path):
    """MAX_RESTARTS=0 (the default): the kill ends the job, with one summary line and exit status 1."""
    dump = tmp_path / "job"
    proc = _start(dump, ngpu=1, max_restarts="0")
    try:
        _wait(lambda: 1 in _logged(dump), proc, "step 1")
        _kill_rank(proc, 0)
    finally:
        out = _finish(proc, dump)
    assert proc.returncode == 1, out[-3000:]
    assert out.strip().splitlines()[-1] == ("savepoint: rank 0 failed: killed by SIGKILL (often the kernel's "
                                            "out-of-memory killer: see dmesg)"), out[-3000:]
    assert "restarting every worker" not in out and "Traceback" not in out


def test_a_bad_max_restarts_is_refused_with_one_line(tmp_path):
    for bad in ("-1", "x", "1.5", " "):
        proc = subprocess.run(["./run_train.sh", "--job.dump_folder", str(tmp_path), "--training.steps", "1"],
                              cwd=ROOT, env={**os.environ, "SAVEPOINT_PYTHON": sys.executable, "MAX_RESTARTS": bad},
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.strip().splitlines() == [
            f"error: MAX_RESTARTS={bad}: give how many times a failed job restarts its workers (a whole number, 0 "
            "or more), e.g. MAX_RESTARTS=3 ./run_train.sh, or leave it unset for 0 (no restart)"], proc.stderr
        assert not (tmp_path / "metrics.jsonl").exists()


def test_after_sigterm_a_failed_worker_is_not_restarted(tmp_path):
    """A preemption whose save does not make it in time (a grace period of 1 ms) fails the worker: with
    MAX_RESTARTS=1 the launcher still restarts nothing (the node is going away) and the job exits 1."""
    dump = tmp_path / "job"
    proc = _start(dump, "--checkpoint.preemption_grace_seconds", "0.001", ngpu=1, max_restarts="1")
    try:
        _wait(lambda: 1 in _logged(dump), proc, "step 1")
        proc.send_signal(signal.SIGTERM)  # the launcher: it passes SIGTERM on to the worker
    finally:
        out = _finish(proc, dump)
    assert proc.returncode == 1, out[-3000:]
    assert "restarting every worker" not in out, out[-3000:]
    assert out.strip().splitlines()[-1] == (
        "savepoint: rank 0 failed with exit code 1 (after SIGTERM, so not restarted); its error is above (rerun "
        "with SAVEPOINT_DEBUG=1 for a traceback)"), out[-3000:]
