"""One writer per checkpoint folder: ``.savepoint.lock`` refuses a second job and survives a dead one."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from savepoint.checkpoint.lock import LOCK_NAME, FolderLock
from savepoint.checkpoint.storage import CheckpointFolder
from savepoint.errors import CheckpointError
from tests.conftest import FAST_ARGS, ROOT

CLI_ARGS = [*FAST_ARGS, "--training.steps", "2", "--checkpoint.interval", "1"]


def cli_train(dump, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "savepoint", "train", "--job.config_file", str(ROOT / "configs/debug_model.toml"),
           "--job.dump_folder", str(dump), *CLI_ARGS, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_second_job_is_refused_and_the_lock_is_released_at_exit(tmp_path):
    root = tmp_path / "run/checkpoint"
    root.mkdir(parents=True)
    holder = FolderLock(root)
    holder.acquire()  # this test process plays the first job
    info = json.loads((root / LOCK_NAME).read_text())
    assert info["pid"] == os.getpid() and info["host"] and info["started"] and "command" in info
    refused = cli_train(tmp_path / "run")
    assert refused.returncode == 1
    error = refused.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: checkpoint folder {root} is in use by another job: pid {os.getpid()} on host ")
    assert info["started"] in error and "--checkpoint.folder" in error
    assert "Traceback" not in refused.stderr
    assert CheckpointFolder(root).committed_steps() == []  # it wrote nothing, cleaned nothing

    holder.release()
    assert not (root / LOCK_NAME).exists()
    done = cli_train(tmp_path / "run")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert sorted(p.name for p in root.iterdir()) == ["step-1", "step-2"]  # released (and removed) at close


def test_stale_lock_of_a_killed_job_is_taken_over(tmp_path):
    root = tmp_path / "run/checkpoint"
    root.mkdir(parents=True)
    code = (f"from savepoint.checkpoint.lock import FolderLock; FolderLock({str(root)!r}).acquire(); "
            "print('locked', flush=True); import time; time.sleep(60)")
    dead = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert dead.stdout.readline().strip() == "locked"
    with pytest.raises(CheckpointError, match=rf"in use by another job: pid {dead.pid} on host"):
        FolderLock(root).acquire()
    os.kill(dead.pid, signal.SIGKILL)  # no cleanup runs: the file stays, the kernel drops the flock
    dead.wait()
    assert json.loads((root / LOCK_NAME).read_text())["pid"] == dead.pid

    (root / ".step-3.partial").mkdir()  # what the killed job's save left
    proc = cli_train(tmp_path / "run")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"taking over the lock on checkpoint folder {root}: it was left by pid {dead.pid} on host" in proc.stdout
    assert sorted(p.name for p in root.iterdir()) == ["step-1", "step-2"]


def test_lock_is_held_for_the_job_and_released_on_close(train, tmp_path):
    from savepoint.train import Trainer
    from tests.conftest import make_config

    trainer = Trainer(make_config(tmp_path / "run"))
    root = tmp_path / "run/checkpoint"
    assert trainer.checkpointer.lock.held and (root / LOCK_NAME).is_file()
    with pytest.raises(CheckpointError, match="already locked by this process.*close the first CheckpointManager"):
        Trainer(make_config(tmp_path / "run"))
    reader = Trainer(make_config(tmp_path / "run", "--checkpoint.load_only"))  # readers take no lock
    assert reader.checkpointer.lock is None
    trainer.train(stop_after=5)
    assert CheckpointFolder(root).committed_steps() == [5]  # discovery ignores the lock file
    trainer.checkpointer.close()
    assert not trainer.checkpointer.lock.held and not (root / LOCK_NAME).exists()
    trainer.checkpointer.close()  # twice is harmless
    assert train(stop_after=6).train_state.step == 6  # the next job on the folder starts


def test_seed_checkpoint_takes_and_releases_the_lock(tmp_path):
    from savepoint.train import Trainer
    from tests.conftest import make_config

    trainer = Trainer(make_config(tmp_path / "seed", "--checkpoint.create_seed_checkpoint"))
    trainer.create_seed_checkpoint()
    trainer.checkpointer.close()
    assert sorted(p.name for p in (tmp_path / "seed/checkpoint").iterdir()) == ["step-0"]


def test_lock_file_survives_a_race_with_its_release(tmp_path):
    """Acquire after the holder removed the file between our open and flock: we lock the new file."""
    first = FolderLock(tmp_path)
    first.acquire()
    first.release()
    second = FolderLock(tmp_path)
    second.acquire()
    third = FolderLock(tmp_path)
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="already locked by this process"):
        third.acquire()
    assert time.monotonic() - start < 5
    second.release()
    third.acquire()
    third.release()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["symlink", "fifo", "folder"])
def test_lock_file_that_is_not_a_regular_file_is_refused_untouched(tmp_path, kind):
    root = tmp_path / "checkpoint"
    root.mkdir()
    target = tmp_path / "precious.txt"
    target.write_text("not the lock's to overwrite\n")
    lock_path = root / LOCK_NAME
    if kind == "symlink":
        lock_path.symlink_to(target)
    elif kind == "fifo":
        os.mkfifo(lock_path)
    else:
        lock_path.mkdir()
    what = {"symlink": "a symbolic link", "fifo": "a FIFO (named pipe)", "folder": "a folder"}[kind]
    with pytest.raises(CheckpointError, match=re.escape(f"the lock file {lock_path} is {what}, not a regular file")
                       + ".* remove it "):
        FolderLock(root).acquire()
    assert target.read_text() == "not the lock's to overwrite\n"
    assert os.path.lexists(lock_path)  # nothing removed either: the user decides
    assert lock_path.is_symlink() == (kind == "symlink")


def test_checkpoint_folder_deleted_mid_run_takes_the_lock_again(train, tmp_path, caplog):
    import shutil

    from savepoint.train import Trainer
    from tests.conftest import make_config

    trainer = Trainer(make_config(tmp_path / "run", "--checkpoint.interval", "2"))
    root = tmp_path / "run/checkpoint"
    trainer.train(stop_after=2)
    shutil.rmtree(root)  # a user deletes the folder while the job runs
    with caplog.at_level("WARNING", logger="savepoint"):
        trainer.train(stop_after=4)
    assert CheckpointFolder(root).committed_steps() == [4]
    assert f"checkpoint folder {root} was deleted while this job was saving into it: took its lock again" \
        in caplog.text
    assert trainer.checkpointer.lock.held and (root / LOCK_NAME).is_file()
    with pytest.raises(CheckpointError, match="already locked by this process"):
        FolderLock(root).acquire()  # a second job is refused again

    (root / LOCK_NAME).unlink()  # the lock file alone removed: taken again as well
    trainer.train(stop_after=6)
    assert CheckpointFolder(root).committed_steps() == [4, 6]
    assert "lost its lock file (deleted or replaced)" in caplog.text
    trainer.checkpointer.close()
    assert not (root / LOCK_NAME).exists()


def test_checkpoint_folder_taken_by_another_job_meanwhile_stops_the_job(tmp_path):
    import shutil

    from savepoint.errors import FatalCheckpointError
    from savepoint.train import Trainer
    from tests.conftest import make_config

    trainer = Trainer(make_config(tmp_path / "run", "--checkpoint.interval", "2"))
    root = tmp_path / "run/checkpoint"
    trainer.train(stop_after=2)
    shutil.rmtree(root)
    root.mkdir()
    code = (f"from savepoint.checkpoint.lock import FolderLock; FolderLock({str(root)!r}).acquire(); "
            "print('locked', flush=True); import time; time.sleep(60)")
    other = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "locked"
        with pytest.raises(FatalCheckpointError) as err:  # not a failed periodic save: training stops
            trainer.train(stop_after=4)
    finally:
        other.kill()
        other.wait()
    message = str(err.value)
    assert message.startswith(f"checkpoint folder {root} lost its lock file (deleted or replaced) while this job "
                              "was saving into it, and the job could not lock it again (checkpoint folder ")
    assert f"in use by another job: pid {other.pid} on host" in message
    assert trainer.train_state.step == 4  # it stopped at the save, which committed nothing
    assert CheckpointFolder(root).committed_steps() == []
    trainer.checkpointer.close()
