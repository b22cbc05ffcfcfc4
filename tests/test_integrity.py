"""Checksums, ``savepoint verify``, corruption on load, and loading that never runs code from a checkpoint."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import losses
from torch.distributed.checkpoint.api import CheckpointException

from savepoint.checkpoint.coordination import root_cause
from savepoint.checkpoint.manifest import read_manifest
from savepoint.checkpoint.reader import VerifyingReader
from savepoint.checkpoint.safe_load import SafeLoadPlanner
from savepoint.checkpoint.storage import CheckpointFolder
from savepoint.checkpoint.verify import verify_step
from savepoint.cli import main as cli
from savepoint.errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError


@pytest.fixture
def saved(train, tmp_path):
    """A run with committed full steps 5 and 10."""
    train("--training.steps", "10")
    return CheckpointFolder(tmp_path / "run/checkpoint")


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


def test_every_stored_item_has_a_checksum_made_while_writing(saved):
    step = saved.step_dir(10)
    manifest = read_manifest(step)
    files = manifest["checksums"]["files"]
    assert manifest["checksums"]["algorithm"] == "xxh3_128"
    assert set(files) == {".metadata", "__0_0.distcp"}
    assert not list(step.glob(".*.sums.json"))  # the writers' sidecars were folded into the manifest
    # The writer cut one segment per stored item: they coincide with the items .metadata lists.
    metadata = VerifyingReader.for_step(step).read_metadata()
    items = sorted((i.offset, i.offset + i.length) for i in metadata.storage_data.values())
    assert [tuple(s[:2]) for s in files["__0_0.distcp"]["segments"]] == items
    report = verify_step(step)
    assert report.ok and report.verified and report.checked_bytes == sum(f["size"] for f in files.values())


@pytest.mark.parametrize("target", ["__0_0.distcp", ".metadata", "manifest.json"])
def test_a_flipped_bit_is_reported_with_its_file_and_byte_range(saved, target, capsys):
    path = saved.step_dir(10) / target
    offset = path.stat().st_size // 2
    flip_bit(path, offset, bit=5)
    report = verify_step(saved.step_dir(10))
    assert not report.ok
    assert str(path) in report.problems[0]
    if target == "__0_0.distcp":
        segment = [s for s in read_manifest(saved.step_dir(10))["checksums"]["files"][target]["segments"]
                   if s[0] <= offset < s[1]][0]
        assert f"bytes [{segment[0]}, {segment[1]})" in report.problems[0]
    assert cli(["verify", str(saved.root)]) == 1
    out = capsys.readouterr()
    assert "step-5: OK" in out.out and "step-10: CORRUPT" in out.out
    assert "1 of 2 step(s) failed verification: step-10" in out.err


def test_truncation_is_reported_with_the_offset(saved):
    path = saved.step_dir(10) / "__0_0.distcp"
    size = path.stat().st_size
    os.truncate(path, size - 1000)
    report = verify_step(saved.step_dir(10))
    assert not report.ok and f"truncated at byte {size - 1000}" in report.problems[0]


def test_an_explicit_corrupt_step_is_an_error(saved, train):
    flip_bit(saved.step_dir(10) / "__0_0.distcp", 12345)
    before = {p.name: p.read_bytes() for p in saved.step_dir(10).iterdir()}
    with pytest.raises(CorruptCheckpointError, match=r"step-10/__0_0.distcp is corrupt: bytes \[") as err:
        train("--checkpoint.load_step", "10", "--training.steps", "12")
    assert "savepoint verify" in str(err.value) and "--checkpoint.load_step" in str(err.value)
    assert {p.name: p.read_bytes() for p in saved.step_dir(10).iterdir()} == before  # nothing touched


def test_auto_resume_falls_back_past_a_corrupt_latest_step_and_reproduces_training(saved, train, tmp_path, caplog):
    reference = losses(tmp_path / "run")
    flip_bit(saved.step_dir(10) / "__0_0.distcp", saved.step_dir(10).joinpath("__0_0.distcp").stat().st_size - 7)
    with caplog.at_level(logging.ERROR, logger="savepoint"):
        trainer = train("--training.steps", "10")
    assert trainer.loaded_step == 5
    assert any("CORRUPT CHECKPOINT" in r.getMessage() and "step-10" in r.getMessage() for r in caplog.records)
    assert {s: losses(tmp_path / "run")[s] for s in range(6, 11)} == {s: reference[s] for s in range(6, 11)}
    assert verify_step(saved.step_dir(10)).ok  # step 10 was saved again, intact


def test_fail_on_corruption_stops_auto_resume(saved, train):
    flip_bit(saved.step_dir(10) / ".metadata", 100)
    with pytest.raises(CorruptCheckpointError, match="fail_on_corruption is set"):
        train("--checkpoint.fail_on_corruption", "--training.steps", "12")


class _Evil:
    """Pickles to a call of os.system: whoever unpickles it runs the command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_hostile_metadata_runs_nothing_and_names_the_forbidden_object(saved, train, tmp_path):
    marker = tmp_path / "pwned"
    step = saved.step_dir(10)
    for manifest in saved.root.glob("step-*/manifest.json"):
        manifest.unlink()  # a hostile folder would not bring honest checksums (so none of its steps has them)
    (step / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(UnsafeCheckpointError, match=r"asks to load (posix|os)\.system") as err:
        train("--checkpoint.load_step", "10")
    assert "Nothing was executed" in str(err.value)
    report = verify_step(step)
    assert not report.ok and "system" in report.problems[0]
    assert not marker.exists()
    pickle.loads((step / ".metadata").read_bytes())  # the same bytes, unpickled the usual way, do run it
    assert marker.exists()


def test_hostile_value_in_a_checkpoint_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    step = tmp_path / "step-1"
    dcp.save({"w": torch.ones(3), "extra": _Evil(marker)}, checkpoint_id=step, no_dist=True)
    assert not marker.exists()
    target = {"w": torch.zeros(3), "extra": None}
    with pytest.raises(CheckpointException) as err:
        dcp.load(target, storage_reader=VerifyingReader(step), planner=SafeLoadPlanner(), no_dist=True)
    assert "UnsafeCheckpointError: checkpoint value 'extra' holds an object outside plain data (it asks to " \
           "load posix.system)" in root_cause(err.value)
    assert not marker.exists()
    dcp.load(target, checkpoint_id=step, no_dist=True)  # stock DCP runs it: the threat is real
    assert marker.exists()


def test_plain_values_still_load(tmp_path):
    step = tmp_path / "step-1"
    value = {"step": 7, "lrs": [0.1, 0.2], "name": "x", "nested": {"t": torch.arange(3)}}
    dcp.save({"w": torch.ones(3), "extra": value}, checkpoint_id=step, no_dist=True)
    target = {"w": torch.zeros(3), "extra": {"step": 0, "lrs": [0.0, 0.0], "name": "", "nested": {"t": torch.zeros(3)}}}
    dcp.load(target, storage_reader=VerifyingReader(step), planner=SafeLoadPlanner(), no_dist=True)
    assert target["extra"]["step"] == 7 and target["extra"]["lrs"] == [0.1, 0.2] and target["extra"]["name"] == "x"
    assert torch.equal(target["w"], torch.ones(3))
    assert torch.equal(target["extra"]["nested"]["t"], torch.arange(3).float())


def test_steps_without_checksums_get_the_structural_check(saved, tmp_path):
    step = tmp_path / "titan" / "step-1"
    dcp.save({"w": torch.ones(1000), "extra": {"step": 1}}, checkpoint_id=step, no_dist=True)  # as TorchTitan does
    report = verify_step(step)
    assert report.ok and not report.verified and "no checksums" in report.notes[0]
    data = step / "__0_0.distcp"
    os.truncate(data, data.stat().st_size // 2)
    report = verify_step(step)
    assert not report.ok and ".metadata places 'w' at bytes" in report.problems[0]
    # A step savepoint wrote is never taken for one of those, even alone in its folder.
    ours = tmp_path / "copied" / "step-10"
    shutil.copytree(saved.step_dir(10), ours)
    (ours / "manifest.json").unlink()
    report = verify_step(ours)
    assert not report.ok and "shows savepoint wrote this step (into .step-10.partial)" in report.problems[0]


@pytest.mark.parametrize("mode", ["async", "async_with_pinned_mem"])
def test_async_saves_are_hashed_by_their_writer(train, tmp_path, mode):
    train("--training.steps", "10", "--checkpoint.async_mode", mode)
    step = tmp_path / "run/checkpoint/step-5"
    segments = read_manifest(step)["checksums"]["files"]["__0_0.distcp"]["segments"]
    assert len(segments) > 100  # one per item: hashed while writing, not block-hashed afterwards
    assert verify_step(step).ok


def test_verify_cli_on_a_healthy_folder_and_bad_paths(saved, tmp_path, capsys):
    assert cli(["verify", str(saved.root)]) == 0
    assert capsys.readouterr().out.count("checksums match") == 2
    assert cli(["verify", str(tmp_path / "missing")]) == 1
    assert "is not a folder" in capsys.readouterr().err
    json.loads((saved.step_dir(5) / "manifest.json").read_text())  # still plain JSON for people and tools


def test_a_writer_whose_trainer_died_writes_nothing_more(tmp_path):
    from savepoint.checkpoint.hashing import HashingFileSystem

    fs = HashingFileSystem()
    with fs.create_stream(tmp_path / "__0_0.distcp", "wb") as stream:
        stream.write(b"x" * 10)
    assert (tmp_path / "__0_0.distcp").read_bytes() == b"x" * 10
    fs.owner = -1  # as seen from a writer process whose trainer (its parent) is gone
    with pytest.raises(CheckpointError, match="the training process -1 that started this save is gone"):
        with fs.create_stream(tmp_path / ".metadata.tmp", "wb"):
            pass
    with pytest.raises(CheckpointError, match="is gone"):
        fs.rename(tmp_path / "__0_0.distcp", tmp_path / ".metadata")
    assert not (tmp_path / ".metadata.tmp").exists() and not (tmp_path / ".metadata").exists()
