"""Async saves (``async`` and ``async_with_pinned_mem``): same bytes as sync saves, failures surface, exit commits."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from savepoint.checkpoint.storage import CheckpointFolder
from savepoint.errors import CheckpointError
from tests.conftest import losses

MODES = ["async", "async_with_pinned_mem"]


def saved(step_dir, tmp_path) -> dict[str, torch.Tensor]:
    out = tmp_path / f"{step_dir.parent.parent.name}-{step_dir.name}.pt"
    dcp_to_torch_save(step_dir, out)
    flat = {}

    def walk(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(torch.load(out, weights_only=False))
    return flat


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("mode", MODES)
def test_async_saves_equal_sync_saves_and_resume_bit_exactly(train, tmp_path, mode):
    sync = train(dump=tmp_path / "sync")
    trainer = train("--checkpoint.async_mode", mode, dump=tmp_path / "async", stop_after=12)
    trainer.checkpointer.close()
    # Training went on (and changed every parameter) while steps 5 and 10 were written.
    for step in (5, 10):
        assert_same(saved(tmp_path / f"sync/checkpoint/step-{step}", tmp_path),
                    saved(tmp_path / f"async/checkpoint/step-{step}", tmp_path))
    resumed = train("--checkpoint.async_mode", mode, dump=tmp_path / "async")
    resumed.checkpointer.close()
    expected, got = losses(tmp_path / "sync"), losses(tmp_path / "async")
    assert [got[s] for s in range(11, 21)] == [expected[s] for s in range(11, 21)]
    for key, value in sync.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key


@pytest.mark.parametrize("mode", MODES)
def test_exit_waits_for_the_save_in_flight_and_commits_it(train, tmp_path, mode):
    trainer = train("--checkpoint.async_mode", mode, stop_after=10)
    folder = CheckpointFolder(tmp_path / "run/checkpoint")
    assert trainer.checkpointer.saver.inflight is not None and trainer.checkpointer.saver.inflight.step == 10
    assert 10 not in folder.committed_steps()  # not visible before every rank has written it
    trainer.checkpointer.close()
    assert folder.committed_steps() == [5, 10]
    assert not list(folder.root.glob(".step-*"))


@pytest.mark.parametrize("mode", MODES)
def test_background_failure_surfaces_and_commits_nothing(train, tmp_path, mode, monkeypatch, caplog):
    trainer = train("--checkpoint.async_mode", mode, stop_after=5)
    trainer.checkpointer.finish_inflight()
    step5 = tmp_path / "run/checkpoint/step-5"
    before = {p.name: p.read_bytes() for p in step5.iterdir()}

    def broken(self, plan, planner):
        raise OSError(28, "No space left on device (injected)")

    monkeypatch.setattr(FileSystemWriter, "write_data", broken)
    trainer.train(stop_after=10)  # step 10's save starts and fails in the background
    with caplog.at_level(logging.ERROR, logger="savepoint"):
        trainer.train(stop_after=12)  # the first step that finds the save finished logs it, and goes on
    if trainer.checkpointer.saver.inflight is not None:  # not finished by step 12: exit reports it
        with pytest.raises(CheckpointError, match=r"async saving step 10 .* failed .*No space left on device"):
            trainer.checkpointer.finish_inflight()
    else:
        assert re.search(r"async saving step 10 .* failed .*No space left on device.*training continues",
                         caplog.text)
    assert trainer.train_state.step == 12
    folder = CheckpointFolder(tmp_path / "run/checkpoint")
    assert folder.committed_steps() == [5]
    assert not list(folder.root.glob(".step-*"))
    assert {p.name: p.read_bytes() for p in step5.iterdir()} == before
