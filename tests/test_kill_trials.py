"""Kill trials: SIGKILL training at random instants, restart, check resume and checkpoints.

The harness (``tests/trials/kill.py``) forks the training runs, so it runs in a fresh interpreter
here: forking pytest's own process, whose torch thread pools earlier tests may have started, would
not be safe. The default run has small campaigns; the full ones (the figures the README quotes) are
marked ``slow``: ``./run_tests.sh -m slow tests/test_kill_trials.py``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from savepoint.durable import DCP_MARKER, MANIFEST
from tests.trials import folder as kt
from tests.trials.job import MODES

ROOT = Path(__file__).resolve().parent.parent


def _campaign(tmp_path: Path, args: list[str], timeout: float) -> tuple[dict, subprocess.CompletedProcess]:
    """``python -m tests.trials.kill ARGS`` in a fresh interpreter; its JSON counts and the finished process."""
    out = tmp_path / "summary.json"
    proc = subprocess.run([sys.executable, "-m", "tests.trials.kill", *args, "--workdir", str(tmp_path / "work"),
                           "--json", str(out)], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc


def _by_mode(trials: int, modes=MODES) -> dict[str, int]:
    """Trials per mode: the harness spreads them round-robin."""
    return {m: len(range(i, trials, len(modes))) for i, m in enumerate(modes)}


@pytest.mark.parametrize(("trials", "seed", "jobs", "min_kills", "timeout"), [
    # 12 trials, 4 per async mode; 3 steps (a save after each, keep_latest_k=2, so step 3 deletes step 1).
    pytest.param(12, 6, 2, 8, 600, id="12-trials"),  # a few runs may finish before their kill lands
    pytest.param(1000, 0, 2, 700, 4 * 3600, id="1000-trials", marks=pytest.mark.slow),
])
def test_kill_trials_leave_loadable_exact_checkpoints(tmp_path, trials, seed, jobs, min_kills, timeout):
    summary, proc = _campaign(tmp_path, ["--trials", str(trials), "--seed", str(seed), "--mode", "all",
                                         "--steps", "3", "--jobs", str(jobs)], timeout)
    assert summary["trials"] == trials
    assert summary["by_mode"] == _by_mode(trials)
    assert not summary["bad_trials"], json.dumps(summary["bad_trials"], indent=1)[:6000]
    assert summary["kills"] >= min_kills
    assert proc.returncode == (1 if summary["bad"] else 0), proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize(("trials", "seed", "timeout"), [
    pytest.param(3, 1, 600, id="3-trials"),
    pytest.param(60, 2, 2 * 3600, id="60-trials", marks=pytest.mark.slow),
])
def test_kill_trials_at_two_ranks(tmp_path, trials, seed, timeout):
    """Trials at world size 2 (gloo), one per mode by default: both ranks and the writer processes die together."""
    summary, proc = _campaign(tmp_path, ["--trials", str(trials), "--seed", str(seed), "--mode", "all",
                                         "--world-size", "2", "--steps", "3"], timeout)
    assert summary["trials"] == trials and summary["by_mode"] == _by_mode(trials)
    assert not summary["bad_trials"], json.dumps(summary["bad_trials"], indent=1)[:6000]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize(("trials", "seed", "mode", "min_kills", "timeout"), [
    pytest.param(2, 1, "disabled,async", 2, 600, id="2-trials"),  # seed 1: both kills halfway through the run
    pytest.param(30, 3, "all", 20, 2 * 3600, id="30-trials", marks=pytest.mark.slow),  # a run may end first
])
def test_kill_trials_at_pp2(tmp_path, trials, seed, mode, min_kills, timeout):
    """Pipeline parallelism at two ranks, two stages each (Interleaved1F1B): both stages die together, the
    restart resumes from the newest committed step and every loss is bit-identical to an uninterrupted run's."""
    summary, proc = _campaign(tmp_path, ["--trials", str(trials), "--seed", str(seed), "--mode", mode,
                                         "--world-size", "2", "--pp", "2", "--steps", "3"], timeout)
    modes = MODES if mode == "all" else tuple(mode.split(","))
    assert summary["trials"] == trials and summary["by_mode"] == _by_mode(trials, modes)
    assert summary["layout"] == {"world_size": 2, "pp": 2, "pp_schedule": "Interleaved1F1B", "memory_interval": 0}
    assert not summary["bad_trials"], json.dumps(summary["bad_trials"], indent=1)[:6000]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    resumed = re.search(r"^restarts: .*resume (\d+)", proc.stdout, re.MULTILINE)
    assert summary["kills"] >= min_kills and resumed and int(resumed[1]) >= 1, proc.stdout[-3000:]


@pytest.mark.parametrize(("trials", "seed", "mode", "min_kills", "timeout"), [
    # Seed 0: a kill of the whole group late in the run, then of the launcher alone in start-up (~80 s).
    pytest.param(2, 0, "async_with_pinned_mem", 2, 900, id="2-trials"),
    pytest.param(30, 0, "all", 20, 3 * 3600, id="30-trials", marks=pytest.mark.slow),  # a run may end first
])
def test_launcher_kill_trials(tmp_path, trials, seed, mode, min_kills, timeout):
    """SIGKILL the launcher (torchrun, as ./run_train.sh runs it) or its process group at two ranks with
    writer processes: within 2 s no process of the job is left, and the restart, started at once,
    resumes from the newest committed step with bit-identical losses."""
    summary, proc = _campaign(tmp_path, ["--trials", str(trials), "--seed", str(seed), "--mode", mode,
                                         "--world-size", "2", "--steps", "3", "--target", "launcher"], timeout)
    assert summary["trials"] == trials
    assert not summary["bad_trials"], json.dumps(summary["bad_trials"], indent=1)[:6000]
    launcher = summary["launcher"]
    assert launcher["kills"] >= min_kills and launcher["survivors"] == 0, launcher
    assert launcher["restarts"] == {"ok": launcher["kills"]}, launcher  # every killed job restarted and finished
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize(("trials", "seed", "mode", "memory", "min_kills", "timeout"), [
    pytest.param(2, 0, "async_with_pinned_mem", 1, 1, 900, id="2-trials"),  # a run may end before its kill
    pytest.param(30, 0, "all", 0, 20, 3 * 3600, id="30-trials", marks=pytest.mark.slow),
    pytest.param(30, 1, "all", 1, 20, 3 * 3600, id="30-trials-memory", marks=pytest.mark.slow),
])
def test_worker_kill_trials(tmp_path, trials, seed, mode, memory, min_kills, timeout):
    """SIGKILL one worker (a random rank) of a two-rank job that torchrun restarts (--max-restarts 1), with
    the in-memory tier or without: every job finishes by itself with exit 0, bit-identical losses, the
    restart trained from the newest step every rank held, the folder sound, no process left."""
    summary, proc = _campaign(tmp_path, ["--trials", str(trials), "--seed", str(seed), "--mode", mode,
                                         "--world-size", "2", "--steps", "4", "--target", "worker",
                                         "--memory-interval", str(memory)], timeout)
    assert summary["trials"] == trials and summary["layout"]["memory_interval"] == memory
    assert not summary["bad_trials"], json.dumps(summary["bad_trials"], indent=1)[:6000]
    launcher = summary["launcher"]
    assert launcher["kills"] >= min_kills and launcher["by_kind"] == {"worker": launcher["kills"]}, launcher
    assert launcher["restarts"] == {"ok": trials}, launcher  # every job, killed or not, finished with exit 0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"^worker kills: \d+; restarts from the in-memory tier \d+", proc.stdout, re.MULTILINE), \
        proc.stdout[-3000:]


def test_folder_reading_and_phases(tmp_path):
    root = tmp_path / "checkpoint"
    for name, files in {"step-2": [DCP_MARKER], "step-3": [], ".step-4.replaced": [DCP_MARKER],
                        ".step-5.partial": [DCP_MARKER]}.items():
        (root / name).mkdir(parents=True)
        for f in files:
            (root / name / f).write_bytes(b"x")
    state = kt.read_folder(root)
    assert state.committed == [2] and state.incomplete == [3] and state.restorable == [4]
    assert state.expected_resume == 4  # the restart puts step-4 back from .step-4.replaced
    assert kt.verify_folder(root, state)[0].startswith(f"step-3 is visible without {DCP_MARKER}")
    assert kt.classify_phase(root, tmp_path) == "resave"
    (root / ".step-4.replaced").rename(root / "step-4")
    assert kt.classify_phase(root, tmp_path) == "metadata"
    (root / ".step-5.partial" / MANIFEST).write_text("{}")
    assert kt.classify_phase(root, tmp_path) == "commit"
    (root / ".step-5.partial").rename(root / ".step-1.trash")
    assert kt.classify_phase(root, tmp_path) == "retention"


def test_losses_survive_a_torn_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_bytes(b'{"step": 1, "loss": 2.5}\n{"step": 2, "lo'
                                             b'{"step": 2, "loss": 3.5}\n')
    records, end = kt.read_losses(tmp_path)
    assert records == [(1, 2.5), (2, 3.5)] and end == (tmp_path / "metrics.jsonl").stat().st_size
    assert kt.compare_losses(records, {1: 2.5, 2: 3.5}) == []
    assert kt.compare_losses(records, {1: 2.5, 2: 3.5000000000000004}) != []
