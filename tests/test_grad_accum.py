"""Gradient accumulation: training.global_batch_size over micro-steps, through the real trainer."""

from __future__ import annotations

import logging

import pytest

from savepoint.checkpoint.storage import CheckpointFolder
from savepoint.errors import ConfigError
from tests.conftest import losses
from tests.test_resume import assert_bit_identical, optimizer_tensors

SMALL = ("--training.seq_len", "16", "--training.steps", "4", "--checkpoint.interval", "2")


def test_two_micro_steps_match_one_big_batch(train, tmp_path):
    big = train(*SMALL, "--training.local_batch_size", "16", dump=tmp_path / "big")
    accum = train(*SMALL, "--training.local_batch_size", "8", "--training.global_batch_size", "16",
                  dump=tmp_path / "accum")
    assert accum.micro_steps == 2 and big.micro_steps == 1
    expected, got = losses(tmp_path / "big"), losses(tmp_path / "accum")
    assert sorted(got) == sorted(expected) == list(range(1, 5))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-6, rel=0), step
    assert expected[1] != expected[4]  # it trained
    # The same samples per optimizer step, the same position, every micro-step's tokens counted.
    assert accum.dataloader.sample_index == big.dataloader.sample_index == 4 * 16
    assert accum.train_state.ntokens_seen == big.train_state.ntokens_seen == 4 * 16 * 16
    for key, value in big.model.state_dict().items():
        assert (accum.model.state_dict()[key] - value).abs().max() < 1e-5, key


def test_resume_mid_run_is_bit_exact(train, tmp_path):
    accum = (*SMALL, "--training.local_batch_size", "4", "--training.global_batch_size", "8")
    straight = train(*accum, dump=tmp_path / "straight")
    train(*accum, dump=tmp_path / "resumed", stop_after=2)
    assert CheckpointFolder(tmp_path / "resumed/checkpoint").committed_steps() == [2]
    resumed = train(*accum, dump=tmp_path / "resumed")
    expected, got = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert [got[s] for s in range(3, 5)] == [expected[s] for s in range(3, 5)]
    assert_bit_identical(straight.model.state_dict(), resumed.model.state_dict())
    assert_bit_identical(optimizer_tensors(straight), optimizer_tensors(resumed))
    assert resumed.dataloader.sample_index == straight.dataloader.sample_index == 4 * 8
    assert resumed.train_state.ntokens_seen == straight.train_state.ntokens_seen


@pytest.mark.parametrize("value", ["12", "0", "-2"])
def test_global_batch_not_a_multiple_is_refused(train, value):
    with pytest.raises(ConfigError, match=r"training.global_batch_size is -?\d+, not a multiple of .* 8"):
        train("--training.local_batch_size", "8", "--training.global_batch_size", value)


def test_print_config_logs_the_resolved_toml(train, caplog):
    caplog.set_level(logging.INFO, logger="savepoint.train")
    train("--job.print_config", "--training.global_batch_size", "4", stop_after=0)
    text = caplog.text.split("resolved config:\n", 1)[1]
    assert "[training]\n" in text and "global_batch_size = 4\n" in text and "[activation_checkpoint]\n" in text
    caplog.clear()
    train(stop_after=0)
    assert "resolved config:" not in caplog.text
