"""The training loop's own failure modes: the metrics log, a diverged loss, an unusable dump folder.

Each runs ``savepoint train`` in this process with the debug model at FAST_ARGS sizes.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from savepoint.checkpoint.storage import CheckpointFolder
from tests.conftest import FAST_ARGS, ROOT, run_cli

CONFIG = ROOT / "configs" / "debug_model.toml"


def train_argv(dump: Path, *extra: str) -> list[str]:
    return ["train", "--job.config_file", str(CONFIG), "--job.dump_folder", str(dump), *FAST_ARGS, *extra]


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("SAVEPOINT_DEBUG", raising=False)


def test_metrics_symlink_is_refused_and_its_target_untouched(tmp_path, capsys):
    target = tmp_path / "elsewhere.txt"
    target.write_text("someone else's file\n")
    dump = tmp_path / "run"
    dump.mkdir()
    (dump / "metrics.jsonl").symlink_to(target)
    code, out, err = run_cli(train_argv(dump, "--training.steps", "2"), capsys)
    assert code == 1
    assert err.strip().splitlines() == [f"error: {dump}/metrics.jsonl is a symbolic link, not a regular file: refusing "
                                        "to write the metrics log through it; remove it"]
    assert target.read_text() == "someone else's file\n"
    assert "step     1" not in out  # refused before training


@pytest.fixture
def full_disk(tmp_path):
    """A real 64 KiB tmpfs, filled to the last byte (needs root; skipped elsewhere)."""
    mount = tmp_path / f"full-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        fd = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 512):
                pass
        except OSError as e:
            assert e.errno == errno.ENOSPC
        finally:
            os.close(fd)
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_for_metrics_warns_once_and_training_goes_on(tmp_path, full_disk, capsys):
    """metrics.jsonl cannot grow (ENOSPC); the checkpoints live on another disk and are all committed."""
    checkpoints = tmp_path / "checkpoints"
    code, out, err = run_cli(train_argv(full_disk, "--training.steps", "4", "--checkpoint.interval", "2",
                                        "--checkpoint.folder", str(checkpoints)), capsys)
    assert code == 0, err
    assert err == ""
    warnings = [line for line in out.splitlines() if "WARNING" in line and "metrics.jsonl" in line]
    assert len(warnings) == 1, out
    assert "No space left on device" in warnings[0] and "training goes on" in warnings[0]
    assert "step     4" in out
    assert CheckpointFolder(checkpoints).committed_steps() == [2, 4]
    assert os.path.getsize(full_disk / "metrics.jsonl") == 0


def test_non_finite_loss_stops_training_without_saving(tmp_path, capsys):
    """An lr of 1e30 without clipping blows the weights up at step 1; step 2's gradient norm is NaN."""
    dump = tmp_path / "run"
    code, out, err = run_cli(train_argv(dump, "--training.steps", "6", "--checkpoint.interval", "1",
                                        "--optimizer.lr", "1e30", "--training.max_norm", "0"), capsys)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: step 2: the gradient norm is nan")
    assert "saved nothing" in lines[0] and f"step-1 in {dump}/checkpoint" in lines[0]
    assert "--optimizer.lr" in lines[0]
    assert CheckpointFolder(dump / "checkpoint").committed_steps() == [1]  # no checkpoint of NaN weights
    logged = [json.loads(line)["step"] for line in (dump / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1]


def test_dump_folder_that_cannot_be_created(capsys):
    code, out, err = run_cli(train_argv(Path("/proc/savepoint-test"), "--training.steps", "1"), capsys)
    assert code == 1
    assert err.strip().splitlines() == [
        "error: invalid configuration: --job.dump_folder=/proc/savepoint-test: cannot create /proc/savepoint-test "
        "(No such file or directory); choose a folder you can write to"]
