"""The in-memory tier at one process: what a restart loads, what it falls back to, and what the tier never does.

A job "crashes" here by returning from ``train(stop_after=N)`` without ``close()`` (the RAM copies stay,
as after a SIGKILL); the save in flight is committed first, as if the crash came a moment later, so
the RAM steps are known. Real SIGKILLs under torchrun are in test_restarts.py and the kill trials.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from savepoint.checkpoint.memory_run import RUN_FILE, memory_steps, read_run
from savepoint.checkpoint.storage import CheckpointFolder
from savepoint.train import Trainer
from tests.conftest import ROOT, losses, make_config
from tests.test_resume import assert_bit_identical, optimizer_tensors

STEPS = 8
DURABLE = ["--checkpoint.enable", "--checkpoint.interval", "4", "--training.steps", str(STEPS)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run: its losses and final state."""
    dump = tmp_path_factory.mktemp("straight")
    trainer = Trainer(make_config(dump, *DURABLE))
    trainer.train()
    trainer.checkpointer.close()
    return losses(dump), trainer


def memory_args(shm: Path, interval: int = 1, *more: str) -> list[str]:
    return [*DURABLE, "--checkpoint.memory_interval", str(interval), "--checkpoint.memory_folder", str(shm), *more]


def keep_up(trainer: Trainer) -> Trainer:
    """Make each RAM save finish before the next step's verdict, as a writer faster than a step would: the
    debug model's steps take milliseconds, so due saves would otherwise be skipped (tested apart)."""
    tier = trainer.checkpointer.memory
    if tier is not None:
        tier.idle = lambda: tier.saver.inflight is None or tier.saver.wait() is None or True
    return trainer


def crash(dump: Path, args: list[str], at: int) -> Trainer:
    """Train to step ``at`` and stop without closing: the RAM copies stay (the save in flight is committed)."""
    trainer = keep_up(Trainer(make_config(dump, *args)))
    trainer.train(stop_after=at)
    if trainer.checkpointer.memory is not None:
        trainer.checkpointer.memory.finish()
    trainer.checkpointer.lock.release()
    return trainer


def finish(dump: Path, args: list[str]) -> Trainer:
    trainer = keep_up(Trainer(make_config(dump, *args)))
    trainer.train()
    trainer.checkpointer.close()
    return trainer


def rank_folder(shm: Path) -> CheckpointFolder:
    (run,) = [p for p in shm.iterdir() if p.is_dir()]
    return CheckpointFolder(run / "rank-0")


def assert_same_run(straight, dump: Path, trainer: Trainer, first: int) -> None:
    expected, trained = straight
    got = losses(dump)
    assert [got[s] for s in range(first, STEPS + 1)] == [expected[s] for s in range(first, STEPS + 1)]
    assert_bit_identical(trained.model.state_dict(), trainer.model.state_dict())
    assert_bit_identical(optimizer_tensors(trained), optimizer_tensors(trainer))
    assert trainer.dataloader.sample_index == trained.dataloader.sample_index


def damage(step_dir: Path) -> None:
    data = sorted(step_dir.glob("*.distcp"))[0]
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    data.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def crashed(tmp_path_factory) -> Path:
    """One job that crashed after step 7: durable step-4, RAM steps 6 and 7 (each test restarts a copy)."""
    base = tmp_path_factory.mktemp("crashed")
    crash(base / "run", memory_args(base / "shm", 1, "--checkpoint.keep_latest_k", "1"), at=7)
    return base


def copy_of(crashed: Path, where: Path) -> tuple[Path, Path, list[str]]:
    """A copy of the crashed job (its durable folder and its RAM copies): (dump, shm, the args to restart it)."""
    dump, shm = where / "run", where / "shm"
    shutil.copytree(crashed / "run", dump)
    shutil.copytree(crashed / "shm", shm)
    # A copy of a folder is another run (its RAM steps are not the copy's): bind the run file to the copy,
    # so that the copy stands for the crashed job itself.
    run_file = dump / "checkpoint" / RUN_FILE
    record = json.loads(run_file.read_text())
    st = os.stat(run_file.parent)
    run_file.write_text(json.dumps({**record, "folder": [str(run_file.parent), st.st_dev, st.st_ino]}))
    # The restart keeps the tier on (its RAM steps are read) but saves no more: only the load is under test.
    return dump, shm, memory_args(shm, 100, "--checkpoint.keep_latest_k", "1")


def test_the_crashed_job_holds_ram_steps_apart_from_durable_ones(crashed):
    root = crashed / "run" / "checkpoint"
    assert CheckpointFolder(root).committed_steps() == [4]  # RAM steps are not durable steps
    assert rank_folder(crashed / "shm").committed_steps() == [6, 7]  # memory_keep_latest_k = 2
    assert read_run(root)["memory_folder"] == str(crashed / "shm")
    assert memory_steps(root) == {"rank-0": [6, 7]}


def test_restart_resumes_from_memory_when_it_is_newer(straight, crashed, tmp_path, caplog):
    dump, shm, args = copy_of(crashed, tmp_path)
    with caplog.at_level(logging.INFO):
        trainer = finish(dump, args)
    assert "resuming from the in-memory checkpoint of step 7" in caplog.text
    assert_same_run(straight, dump, trainer, first=8)
    assert CheckpointFolder(dump / "checkpoint").committed_steps() == [8]  # keep_latest_k 1 counts durable steps
    assert not any(shm.iterdir()), "a job that ended cleanly leaves no RAM copy behind"


def test_a_damaged_newest_memory_step_falls_back_to_the_one_before(straight, crashed, tmp_path, caplog):
    dump, shm, args = copy_of(crashed, tmp_path)
    damage(rank_folder(shm).step_dir(7))
    with caplog.at_level(logging.INFO):
        trainer = finish(dump, args)
    assert "the in-memory checkpoint of step 7 cannot be used" in caplog.text
    assert "resuming from the in-memory checkpoint of step 6" in caplog.text
    assert_same_run(straight, dump, trainer, first=7)


def test_damaged_renamed_or_missing_memory_steps_fall_back_to_disk(straight, crashed, tmp_path, caplog):
    dump, shm, args = copy_of(crashed, tmp_path / "damaged")
    for step in (6, 7):
        damage(rank_folder(shm).step_dir(step))
    with caplog.at_level(logging.INFO):
        trainer = finish(dump, args)
    assert "resuming from the in-memory checkpoint" not in caplog.text
    assert "loaded " + str(dump / "checkpoint" / "step-4") in caplog.text  # the durable step
    assert_same_run(straight, dump, trainer, first=5)

    dump, shm, args = copy_of(crashed, tmp_path / "renamed")
    folder = rank_folder(shm)
    shutil.rmtree(folder.step_dir(6))
    folder.step_dir(7).rename(folder.step_dir(9))  # its manifest says step 7: never loaded as step 9
    caplog.clear()
    with caplog.at_level(logging.INFO):
        trainer = finish(dump, args)
    assert "removing in-memory step 9 of rank 0 (written by another layout, run or step: step 7" in caplog.text
    assert_same_run(straight, dump, trainer, first=5)

    dump, shm, args = copy_of(crashed, tmp_path / "rebooted")
    shutil.rmtree(rank_folder(shm).root)  # the node was rebooted
    caplog.clear()
    with caplog.at_level(logging.INFO):
        trainer = finish(dump, args)
    assert "resuming from the in-memory checkpoint" not in caplog.text
    assert_same_run(straight, dump, trainer, first=5)


def test_memory_older_than_disk_loads_disk(straight, tmp_path, caplog):
    dump, shm = tmp_path / "run", tmp_path / "shm"
    args = memory_args(shm, 3)  # RAM at 3 (not 4: a durable save is due then), disk at 4
    crash(dump, args, at=5)
    assert rank_folder(shm).committed_steps() == [3]
    with caplog.at_level(logging.INFO):
        trainer = finish(dump, memory_args(shm, 100))
    assert "the newest in-memory step is 3 and it is older than durable step-4" in caplog.text
    assert_same_run(straight, dump, trainer, first=5)


def test_no_durable_step_and_unusable_memory_is_a_fresh_start(straight, tmp_path):
    """A failed RAM load changes nothing: the fresh start that follows equals an uninterrupted run."""
    dump, shm = tmp_path / "run", tmp_path / "shm"
    args = memory_args(shm, 1, "--checkpoint.interval", "100")
    crash(dump, args, at=3)
    assert CheckpointFolder(dump / "checkpoint").committed_steps() == []
    folder = rank_folder(shm)
    for step in folder.committed_steps():
        damage(folder.step_dir(step))
    trainer = finish(dump, memory_args(shm, 100, "--checkpoint.interval", "100"))
    assert_same_run(straight, dump, trainer, first=1)


def test_inspect_lists_memory_steps_apart_and_verify_checks_one(crashed):
    root = crashed / "run" / "checkpoint"
    out = subprocess.run([sys.executable, "-m", "savepoint", "inspect", str(root)], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "1 committed step(s)" in out.stdout and "step-4" in out.stdout
    assert "in memory on this node" in out.stdout and "rank-0   steps 6, 7" in out.stdout
    step_7 = rank_folder(crashed / "shm").step_dir(7)
    verify = subprocess.run([sys.executable, "-m", "savepoint", "verify", str(step_7)], capture_output=True, text=True,
                            cwd=ROOT)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_a_copied_or_new_folder_never_loads_another_runs_memory(straight, crashed, tmp_path, caplog):
    _, shm, _ = copy_of(crashed, tmp_path)
    (run_a,) = shm.iterdir()
    with caplog.at_level(logging.INFO):
        trainer = crash(tmp_path / "b", memory_args(shm), at=1)
    assert "no checkpoint in" in caplog.text and trainer.loaded_step is None
    assert len(list(shm.iterdir())) == 2 and rank_folder_of(run_a).committed_steps() == [6, 7]
    run_files = [(where / "checkpoint" / RUN_FILE).read_text() for where in (tmp_path / "run", tmp_path / "b")]
    assert run_files[0] != run_files[1]

    dump = tmp_path / "forked"  # cp -r of the job's folder, to start an experiment from it
    shutil.copytree(tmp_path / "run", dump)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        trainer = finish(dump, memory_args(shm, 100))
    assert "resuming from the in-memory checkpoint" not in caplog.text
    assert "loaded " + str(dump / "checkpoint" / "step-4") in caplog.text
    assert_same_run(straight, dump, trainer, first=5)
    assert rank_folder_of(run_a).committed_steps() == [6, 7], "the original job's RAM steps are untouched"


def test_wiped_durable_steps_or_a_rollback_drop_the_ram_steps_that_extend_them(straight, crashed, tmp_path, caplog):
    dump, shm, args = copy_of(crashed, tmp_path / "wiped")
    shutil.rmtree(dump / "checkpoint" / "step-4")  # rm -rf checkpoint/*: the dot files stay
    with caplog.at_level(logging.INFO):
        trainer = finish(dump, args)
    assert "removing in-memory step 7 of rank 0 (durable step-4, which is gone)" in caplog.text
    assert trainer.loaded_step is None and "no checkpoint in" in caplog.text
    assert_same_run(straight, dump, trainer, first=1)

    dump, shm, args = copy_of(crashed, tmp_path / "rollback")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        trainer = crash(dump, [*args, "--checkpoint.load_step", "4"], at=5)
    assert "removing in-memory step 7 of rank 0: the job resumed at step 4" in caplog.text
    assert rank_folder(shm).committed_steps() == [], "steps 6 and 7 of the abandoned trajectory are gone"


def rank_folder_of(run: Path) -> CheckpointFolder:
    return CheckpointFolder(run / "rank-0")


def test_unusable_memory_folder_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = subprocess.run([sys.executable, "-m", "savepoint", "train", "--job.config_file",
                          str(ROOT / "configs" / "debug_model.toml"), "--job.dump_folder", str(tmp_path / "run"),
                          *memory_args(blocker / "shm")], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0
    assert "--checkpoint.memory_folder=" in out.stderr and "memory_interval 0" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 60 MB tmpfs: too small for the debug model's 71 MB step."""
    where = tmp_path / "tmpfs"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=60m", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield where
    subprocess.run(["umount", str(where)], check=True)


def test_a_full_memory_folder_skips_saves_and_training_goes_on(straight, tmp_path, small_tmpfs, caplog):
    dump = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        trainer = finish(dump, memory_args(small_tmpfs))
    assert "skipping the in-memory save of step 1 on rank 0" in caplog.text
    assert caplog.text.count("skipping the in-memory save") == 1  # one warning, not one per step
    assert shutil.disk_usage(small_tmpfs).used < 1 << 20  # nothing written, nothing left
    assert_same_run(straight, dump, trainer, first=1)
    assert torch.equal(trainer.model.tok_embeddings.weight, straight[1].model.tok_embeddings.weight)


def test_due_saves_are_skipped_while_one_is_written_and_training_is_not_held_up(straight, tmp_path, caplog,
                                                                                  monkeypatch):
    """Steps of milliseconds, a RAM save that takes at least half a second: most due saves find the one before
    still being written (the pause makes that so however fast this machine writes, or slow it trains)."""
    from savepoint.checkpoint.hashing import HashingWriter

    real = HashingWriter.write_data

    def slow_write(self, plan, planner):
        time.sleep(0.5)
        return real(self, plan, planner)

    monkeypatch.setattr(HashingWriter, "write_data", slow_write)
    dump, shm = tmp_path / "run", tmp_path / "shm"
    args = memory_args(shm, 1, "--training.steps", "20", "--checkpoint.interval", "100")
    trainer = Trainer(make_config(dump, *args))
    with caplog.at_level(logging.INFO):
        trainer.train(stop_after=19)
        trainer.checkpointer.memory.finish()
        trainer.checkpointer.lock.release()
    saved = [int(m) for m in re.findall(r"saved step (\d+) to memory", caplog.text)]
    assert saved and len(saved) < 19, saved
    assert caplog.text.count("skipped: some rank is still writing the one before") == 1
    assert "due save(s) skipped while it was written" in caplog.text
    assert rank_folder(shm).committed_steps() == saved[-2:]


def test_memory_interval_without_saving_is_refused(tmp_path):
    for extra in ([], ["--checkpoint.enable", "--checkpoint.load_only"]):
        out = subprocess.run([sys.executable, "-m", "savepoint", "check", "--checkpoint.memory_interval", "2", *extra],
                             capture_output=True, text=True, cwd=tmp_path)
        assert out.returncode == 1 and "--checkpoint.memory_interval=2 asks for in-memory saves" in out.stderr


def test_a_memory_folder_removed_mid_run_costs_ram_saves_not_the_run(straight, tmp_path, caplog):
    """tmpwatch or an operator removes the RAM folder while the job runs: the saves warn, training goes on."""
    dump, shm = tmp_path / "run", tmp_path / "shm"
    trainer = keep_up(Trainer(make_config(dump, *memory_args(shm))))
    trainer.train(stop_after=2)
    trainer.checkpointer.memory.finish()
    shutil.rmtree(shm)
    with caplog.at_level(logging.INFO):
        trainer.train()  # on from step 2 to the end, in the same job
    trainer.checkpointer.close()
    assert "in-memory save of step 3 on rank 0" in caplog.text
    assert_same_run(straight, dump, trainer, first=1)
