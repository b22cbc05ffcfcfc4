"""SIGTERM (preemption): finish the step, commit a checkpoint, exit 0; resume continues bit-exactly."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from savepoint.checkpoint.storage import CheckpointFolder
from savepoint.train import Trainer
from tests.conftest import FAST_ARGS, ROOT, losses
from tests.test_run_train import TINY


def sigterm_at(monkeypatch, step: int, where: str = "train_step", times: int = 1) -> None:
    """Send this process SIGTERM (``times`` times) during ``step``: mid-step, or inside its save."""
    if where == "train_step":
        original = Trainer.train_step

        def patched(self):
            if self.train_state.step == step:
                for _ in range(times):
                    os.kill(os.getpid(), signal.SIGTERM)
            return original(self)

        monkeypatch.setattr(Trainer, "train_step", patched)
    else:
        from savepoint.checkpoint.storage import CheckpointFolder as Folder

        original_commit = Folder.commit

        def commit(self, s, manifest):
            if s == step:
                for _ in range(times):
                    os.kill(os.getpid(), signal.SIGTERM)
            return original_commit(self, s, manifest)

        monkeypatch.setattr(Folder, "commit", commit)


def test_sigterm_mid_run_commits_that_step_and_resume_is_bit_exact(train, tmp_path, monkeypatch, caplog):
    short = ("--training.steps", "10")
    straight = train(*short, dump=tmp_path / "straight")
    before = signal.getsignal(signal.SIGTERM)
    sigterm_at(monkeypatch, 7)
    with caplog.at_level(logging.INFO, logger="savepoint"):
        stopped = train(*short, dump=tmp_path / "pre")
    assert signal.getsignal(signal.SIGTERM) is before  # the old handler is back
    assert stopped.train_state.step == 7
    assert CheckpointFolder(tmp_path / "pre/checkpoint").committed_steps() == [5, 7]
    assert "preempted at step 7: checkpoint step-7 committed" in caplog.text
    monkeypatch.undo()
    resumed = train(*short, dump=tmp_path / "pre")
    expected, got = losses(tmp_path / "straight"), losses(tmp_path / "pre")
    assert [got[s] for s in range(1, 11)] == [expected[s] for s in range(1, 11)]
    for key, value in straight.model.state_dict().items():
        assert value.equal(resumed.model.state_dict()[key]), key


def test_sigterm_during_a_save_lets_it_finish_and_ignores_a_second_one(train, tmp_path, monkeypatch, caplog):
    sigterm_at(monkeypatch, 5, where="commit", times=2)  # inside step 5's periodic save
    with caplog.at_level(logging.INFO, logger="savepoint"):
        stopped = train()
    assert stopped.train_state.step == 5
    assert CheckpointFolder(tmp_path / "run/checkpoint").committed_steps() == [5]
    assert "SIGTERM again: ignored" in caplog.text
    assert caplog.text.count("saved step 5") == 1  # just saved: not saved twice
    assert "preempted at step 5: checkpoint step-5 committed" in caplog.text


def test_sigterm_with_an_async_save_in_flight_commits_it(train, tmp_path, monkeypatch, caplog):
    sigterm_at(monkeypatch, 6)
    with caplog.at_level(logging.INFO, logger="savepoint"):
        stopped = train("--checkpoint.async_mode", "async", "--checkpoint.interval", "3")
    assert stopped.train_state.step == 6
    assert stopped.checkpointer.saver.inflight is None
    assert CheckpointFolder(tmp_path / "run/checkpoint").committed_steps() == [3, 6]
    assert caplog.text.count("saved step 6") == 1
    assert "preempted at step 6: checkpoint step-6 committed" in caplog.text


def test_sigterm_without_checkpointing_stops_with_a_warning(train, tmp_path, monkeypatch, caplog):
    sigterm_at(monkeypatch, 3)
    with caplog.at_level(logging.WARNING, logger="savepoint"):
        stopped = train("--checkpoint.no_enable")
    assert stopped.train_state.step == 3
    assert "preempted at step 3: nothing was saved (--checkpoint.enable is off)" in caplog.text
    assert not (tmp_path / "run/checkpoint").exists()


DRIVER = r"""
import sys, time, os, signal
from savepoint import cli
from savepoint.checkpoint.storage import CheckpointFolder
from savepoint.train import Trainer

original_step, original_commit = Trainer.train_step, CheckpointFolder.commit
def train_step(self):
    if self.train_state.step == 3:
        os.kill(os.getpid(), signal.SIGTERM)
    return original_step(self)
def commit(self, step, manifest):
    time.sleep(600)  # a save far slower than the grace period
    return original_commit(self, step, manifest)
Trainer.train_step, CheckpointFolder.commit = train_step, commit
sys.exit(cli.main(["train", *sys.argv[1:]]))
"""


def test_save_slower_than_the_grace_period_exits_nonzero(tmp_path):
    dump = tmp_path / "run"
    cmd = [sys.executable, "-c", DRIVER, "--job.config_file", str(ROOT / "configs/debug_model.toml"),
           "--job.dump_folder", str(dump), *FAST_ARGS, "--checkpoint.preemption_grace_seconds", "2"]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert time.monotonic() - start < 240  # did not wait for the slow save (start-up on a loaded machine: ~30 s)
    assert ("preempted at step 3: no checkpoint committed within --checkpoint.preemption_grace_seconds=2 of SIGTERM; "
            "exiting with status 1") in proc.stdout
    assert CheckpointFolder(dump / "checkpoint").committed_steps() == []  # the unfinished save stays invisible


def test_bad_grace_period_is_a_config_error():
    from savepoint.errors import ConfigError
    from savepoint.job import parse_args

    with pytest.raises(ConfigError, match=r"--checkpoint.preemption_grace_seconds must be finite and > 0"):
        parse_args(["--checkpoint.preemption_grace_seconds", "0"], environ={})


def test_run_train_two_processes_sigterm_exits_0(tmp_path):
    """torchrun at world size 2: SIGTERM to ./run_train.sh reaches both workers; they agree on the step."""
    dump = tmp_path / "out"
    args = ["./run_train.sh", "--job.dump_folder", str(dump), *TINY, "--training.steps", "1000",
            "--checkpoint.enable", "--checkpoint.interval", "500", "--checkpoint.no_last_save_model_only",
            "--metrics.log_freq", "1"]
    env = {**os.environ, "SAVEPOINT_PYTHON": sys.executable, "NGPU": "2"}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = dump / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    stopped = max(losses(dump))
    assert f"preempted at step {stopped}: checkpoint step-{stopped} committed" in out
    assert "SIGTERM passed on to the 2 worker(s)" in err and "Traceback" not in err
    assert CheckpointFolder(dump / "checkpoint").committed_steps() == [stopped]
    names = sorted(p.name for p in (dump / "checkpoint" / f"step-{stopped}").iterdir())
    assert "__0_0.distcp" in names and "__1_0.distcp" in names
