"""Kill trials in CI: SIGKILL training at random instants, restart, check resume and checkpoints.

The harness (``benchmarks/kill_trials.py``) forks the training runs, so it runs in a fresh
interpreter here: forking pytest's own process, whose torch thread pools earlier tests may have
started, would not be safe.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "benchmarks" / "kill_trials.py"

# A kill after the final save commits but before its retention used to leave keep_latest_k + 1 steps
# (the restart had nothing to train, so no save ran retention). Auto-resume now applies it; keep the
# switch to tolerate that outcome only if the fix is ever reverted.
TOLERATE_FINAL_RETENTION_GAP = False


def _tolerated(trial: dict) -> bool:
    extra_old_step = [p.startswith("kept ") or ("hidden []" in p and "at the end: steps" in p)
                      for p in trial["problems"]]
    return TOLERATE_FINAL_RETENTION_GAP and trial["outcome"] == "leftover" and all(extra_old_step)


def _harness():
    spec = importlib.util.spec_from_file_location("kill_trials", HARNESS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_kill_trials_leave_loadable_exact_checkpoints(tmp_path):
    out = tmp_path / "summary.json"
    # 21 trials, 7 per async mode; 3 steps (a save after each, keep_latest_k=2, so step 3 deletes step 1).
    proc = subprocess.run(
        [sys.executable, str(HARNESS), "--trials", "21", "--seed", "6", "--mode", "all", "--steps", "3", "--jobs", "2",
         "--workdir", str(tmp_path / "work"), "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["trials"] == 21
    assert summary["by_mode"] == {"disabled": 7, "async": 7, "async_with_pinned_mem": 7}
    bad = [t for t in summary["bad_trials"] if not _tolerated(t)]
    assert not bad, json.dumps(bad, indent=1)[:6000]
    assert summary["kills"] >= 15  # a few runs may finish before their kill lands
    assert summary["verify"] == "verify_step"
    assert proc.returncode == (1 if summary["bad"] else 0), proc.stdout[-3000:] + proc.stderr[-3000:]


def test_kill_trials_at_two_ranks(tmp_path):
    """One trial per mode at world size 2 (gloo): both ranks and the writer processes die together."""
    out = tmp_path / "summary.json"
    proc = subprocess.run(
        [sys.executable, str(HARNESS), "--trials", "3", "--seed", "1", "--mode", "all", "--world-size", "2",
         "--steps", "3", "--workdir", str(tmp_path / "work"), "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["trials"] == 3 and summary["by_mode"] == {"disabled": 1, "async": 1, "async_with_pinned_mem": 1}
    assert not summary["bad_trials"], json.dumps(summary["bad_trials"], indent=1)[:6000]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_launcher_kill_trials(tmp_path):
    """SIGKILL the launcher (torchrun, as ./run_train.sh runs it) or its process group at two ranks with
    writer processes: within 2 s no process of the job is left, and the restart, started at once,
    resumes from the newest committed step with bit-identical losses."""
    out = tmp_path / "summary.json"
    proc = subprocess.run(
        # Seed 0: a kill of the whole group late in the run, then of the launcher alone in start-up (~80 s).
        [sys.executable, str(HARNESS), "--trials", "2", "--seed", "0", "--mode", "async_with_pinned_mem",
         "--world-size", "2", "--steps", "3", "--target", "launcher", "--workdir", str(tmp_path / "work"),
         "--json", str(out)],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["trials"] == 2
    assert not summary["bad_trials"], json.dumps(summary["bad_trials"], indent=1)[:6000]
    launcher = summary["launcher"]
    assert launcher["kills"] >= 1 and launcher["survivors"] == 0, launcher  # a run may end before its kill
    assert launcher["restarts"] == {"ok": 2}, launcher
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_folder_reading_and_phases(tmp_path):
    kt = _harness()
    root = tmp_path / "checkpoint"
    for name, files in {"step-2": [".metadata"], "step-3": [], ".step-4.replaced": [".metadata"],
                        ".step-5.partial": [".metadata"]}.items():
        (root / name).mkdir(parents=True)
        for f in files:
            (root / name / f).write_bytes(b"x")
    state = kt.read_folder(root)
    assert state.committed == [2] and state.incomplete == [3] and state.restorable == [4]
    assert state.expected_resume == 4  # the restart puts step-4 back from .step-4.replaced
    assert kt.verify_folder(root, state)[0].startswith("step-3 is visible without .metadata")
    assert kt.classify_phase(root, tmp_path) == "resave"
    (root / ".step-4.replaced").rename(root / "step-4")
    assert kt.classify_phase(root, tmp_path) == "metadata"
    (root / ".step-5.partial" / "manifest.json").write_text("{}")
    assert kt.classify_phase(root, tmp_path) == "commit"
    (root / ".step-5.partial").rename(root / ".step-1.trash")
    assert kt.classify_phase(root, tmp_path) == "retention"


def test_losses_survive_a_torn_line(tmp_path):
    kt = _harness()
    (tmp_path / "metrics.jsonl").write_bytes(b'{"step": 1, "loss": 2.5}\n{"step": 2, "lo'
                                             b'{"step": 2, "loss": 3.5}\n')
    records, end = kt.read_losses(tmp_path)
    assert records == [(1, 2.5), (2, 3.5)] and end == (tmp_path / "metrics.jsonl").stat().st_size
    assert kt.compare_losses(records, {1: 2.5, 2: 3.5}) == []
    assert kt.compare_losses(records, {1: 2.5, 2: 3.5000000000000004}) != []
