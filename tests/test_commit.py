"""The commit protocol: a step is visible only when complete, failures leave older steps intact."""

from __future__ import annotations

import json

import pytest
from torch.distributed.checkpoint import FileSystemWriter

from savepoint.checkpoint.storage import CheckpointFolder
from savepoint.errors import CheckpointError


def test_failed_write_leaves_no_step_and_older_steps_intact(train, tmp_path, monkeypatch):
    train(stop_after=5)
    folder = CheckpointFolder(tmp_path / "run/checkpoint")
    before = {p.name: p.read_bytes() for p in folder.step_dir(5).iterdir()}

    def broken_write(self, plan, planner):
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(FileSystemWriter, "write_data", broken_write)
    with pytest.raises(CheckpointError) as err:
        train("--training.steps", "10")  # the final save raises (a periodic one is logged: test_disk_full.py)
    assert "saving step 10" in str(err.value) and "earlier steps are intact" in str(err.value)
    assert "Disk full: the disk holding" in str(err.value) and "--checkpoint.keep_latest_k" in str(err.value)
    assert sorted(p.name for p in folder.root.iterdir()) == ["step-5"]  # no step-10, no leftover
    assert {p.name: p.read_bytes() for p in folder.step_dir(5).iterdir()} == before

    monkeypatch.undo()
    resumed = train(stop_after=5)
    assert resumed.train_state.step == 5


def test_crash_before_rename_is_invisible_and_cleaned(train, tmp_path, monkeypatch):
    train(stop_after=5)
    folder = CheckpointFolder(tmp_path / "run/checkpoint")

    class Crash(BaseException):
        """Stands in for SIGKILL: no except clause runs."""

    def crash(self, step, manifest):
        raise Crash()

    monkeypatch.setattr(CheckpointFolder, "commit", crash)
    with pytest.raises(Crash):
        train(stop_after=10)
    monkeypatch.undo()
    assert (folder.root / ".step-10.partial/.metadata").is_file()  # written, but never published
    assert folder.committed_steps() == [5]
    resumed = train(stop_after=5)  # the next start cleans up, then resumes from step 5
    assert resumed.train_state.step == 5
    assert sorted(p.name for p in folder.root.iterdir()) == ["step-5"]


def test_step_without_marker_is_ignored(train, tmp_path):
    train(stop_after=5)
    folder = CheckpointFolder(tmp_path / "run/checkpoint")
    (folder.root / "step-9").mkdir()  # e.g. a TorchTitan save that died before .metadata
    (folder.root / "step-9" / "__0_0.distcp").write_bytes(b"partial")
    (folder.root / "step-notanumber").mkdir()
    assert folder.committed_steps() == [5]
    assert train(stop_after=5).train_state.step == 5


def test_interrupted_resave_restores_the_old_step(tmp_path):
    folder = CheckpointFolder(tmp_path)
    replaced = tmp_path / ".step-10.replaced"
    replaced.mkdir()
    (replaced / ".metadata").write_bytes(b"old")
    folder.clean_leftovers()
    assert folder.committed_steps() == [10]
    assert (folder.step_dir(10) / ".metadata").read_bytes() == b"old"


def test_resave_of_an_existing_step_replaces_it_whole(train, tmp_path):
    train(stop_after=10)
    folder = CheckpointFolder(tmp_path / "run/checkpoint")
    first = folder.read_manifest(10)
    first_bytes = (folder.step_dir(10) / "__0_0.distcp").read_bytes()
    again = train("--checkpoint.load_step", "5", stop_after=10)
    assert again.train_state.step == 10
    second = folder.read_manifest(10)
    assert second["created_unix"] > first["created_unix"]
    assert sorted(p.name for p in folder.root.iterdir()) == ["step-10", "step-5"]
    # Same seed and same data from step 5: the re-save holds bit-identical tensors.
    assert (folder.step_dir(10) / "__0_0.distcp").read_bytes() == first_bytes


def test_manifest_records_files_and_resolved_config(train, tmp_path):
    train("--training.seed", "7", stop_after=5)
    folder = CheckpointFolder(tmp_path / "run/checkpoint")
    manifest = folder.read_manifest(5)
    assert manifest["step"] == 5 and manifest["kind"] == "full"
    assert manifest["job_config"]["training"]["seed"] == 7
    for name, size in manifest["files"].items():
        assert (folder.step_dir(5) / name).stat().st_size == size
    assert json.loads((folder.step_dir(5) / "manifest.json").read_text()) == manifest


def test_folder_that_is_a_file(train, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint").write_text("not a folder")
    with pytest.raises(CheckpointError, match="is a file, not a folder"):
        train(stop_after=1)


def test_retention_never_leaves_a_half_deleted_step_visible(tmp_path, monkeypatch):
    folder = CheckpointFolder(tmp_path)
    for step in (1, 2, 3):
        folder.step_dir(step).mkdir()
        (folder.step_dir(step) / ".metadata").write_bytes(b"m")
    import shutil

    def dies_midway(path, *a, **k):
        raise RuntimeError("killed while deleting")

    monkeypatch.setattr(shutil, "rmtree", dies_midway)
    with pytest.raises(RuntimeError):
        folder.retain_latest(2, just_saved=3)
    assert folder.committed_steps() == [2, 3]  # step-1 was renamed away before deletion began
    monkeypatch.undo()
    folder.clean_leftovers()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2", "step-3"]


def test_failed_rename_puts_the_old_step_back(tmp_path, monkeypatch):
    import os

    folder = CheckpointFolder(tmp_path)
    folder.step_dir(10).mkdir()
    (folder.step_dir(10) / ".metadata").write_bytes(b"old")
    staging = folder.begin(10)
    (staging / ".metadata").write_bytes(b"new")
    real_rename = os.rename

    def rename(src, dst):
        if str(src).endswith(".partial"):
            raise OSError(5, "I/O error (simulated)")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError):
        folder.commit(10, b"{\"step\": 10}\n")
    assert (folder.step_dir(10) / ".metadata").read_bytes() == b"old"


def test_retention_keeps_the_step_just_saved_after_resuming_an_older_one(train, tmp_path):
    train(stop_after=10)  # steps 5 and 10
    train("--checkpoint.load_step", "5", "--checkpoint.interval", "3", "--checkpoint.keep_latest_k", "1",
          stop_after=6)
    # Step 6 was just written; the older step 5 went; step 10 from the earlier run is left alone.
    assert CheckpointFolder(tmp_path / "run/checkpoint").committed_steps() == [6, 10]


def test_resume_applies_the_retention_a_killed_job_missed(train, tmp_path):
    train("--checkpoint.keep_latest_k", "0")  # steps 5, 10, 15, 20, as if retention never ran
    folder = CheckpointFolder(tmp_path / "run/checkpoint")
    assert folder.committed_steps() == [5, 10, 15, 20]
    resumed = train("--checkpoint.keep_latest_k", "2")  # nothing left to train: no save, no retention
    assert resumed.loaded_step == 20
    assert folder.committed_steps() == [15, 20]
    train("--checkpoint.keep_latest_k", "1", "--checkpoint.load_only")
    assert folder.committed_steps() == [15, 20]  # load_only never deletes
