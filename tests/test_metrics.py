"""What a job reports: the step line, metrics.jsonl, TensorBoard event files, W&B, log colors."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import pty
import resource
import select
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from savepoint import cli
from savepoint.config.job_config import Metrics
from savepoint.errors import ConfigError
from savepoint.metrics import MetricsLog, flops_per_token, peak_flops, peak_flops_of, peak_memory
from savepoint.models.llama3 import LLAMA3_FLAVORS, Transformer

RECORD = {"loss": 2.5, "lr": 1e-3, "grad_norm": 0.75, "samples": [0, 2], "tokens_per_second": 1000.0}


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard's own reader parses the event files in ``folder``."""
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.parametrize("flavor", ["debugmodel", "8B"])
def test_flops_per_token_counts_the_model_parameters(flavor):
    args = LLAMA3_FLAVORS[flavor]
    with torch.device("meta"):
        model = Transformer(args)
    nparams, flops = flops_per_token(args, 2048)
    assert nparams == sum(p.numel() for p in model.parameters())
    embedding = model.tok_embeddings.weight.numel()
    attention = 6 * args.n_layers * args.n_heads * 2 * args.head_dim * 2048
    assert flops == 6 * (nparams - embedding) + attention


def test_step_line_and_jsonl_have_throughput_and_memory_on_cpu(tmp_path, caplog):
    log = MetricsLog(str(tmp_path), 2, Metrics(log_freq=2), model_args=LLAMA3_FLAVORS["debugmodel"], seq_len=32)
    with caplog.at_level(logging.INFO, logger="savepoint.metrics"):
        for step in range(1, 6):
            log.maybe_log(step, step == 5, RECORD)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 5]
    flops = flops_per_token(LLAMA3_FLAVORS["debugmodel"], 32)[1]
    for r in records:
        assert {k: r[k] for k in ("loss", "lr", "grad_norm", "samples")} == {k: RECORD[k] for k in
                                                                           ("loss", "lr", "grad_norm", "samples")}
        assert r["tflops"] == pytest.approx(flops * 1000.0 / 1e12)
        assert r["memory_kind"] == "max_rss" and 0 < r["memory_gib"] < 1024
        assert "mfu_pct" not in r  # no known peak FLOPS for a CPU
    lines = [m for m in caplog.messages if m.startswith("step")]
    assert len(lines) == 3 and "TFLOPS" in lines[0] and "GiB (peak rss)" in lines[0] and "mfu" not in lines[0]


def test_peak_flops_by_device_name():
    assert peak_flops_of("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_of("NVIDIA H100 PCIe") == 756e12 and peak_flops_of("NVIDIA H100 NVL") == 835e12
    assert peak_flops_of("NVIDIA H200") == 989e12 and peak_flops_of("NVIDIA H20") == 148e12
    assert peak_flops_of("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_of("NVIDIA GeForce RTX 3090") is None and peak_flops(torch.device("cpu")) is None


def test_peak_memory_on_cpu_is_the_peak_rss():
    gib, kind = peak_memory(torch.device("cpu"))
    assert kind == "max_rss"
    assert gib == pytest.approx(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1024 ** 3, rel=0.05)


def test_tensorboard_event_files_hold_the_scalars_saves_and_resume(tmp_path):
    log = MetricsLog(str(tmp_path), 1, Metrics(log_freq=1, enable_tensorboard=True, save_tb_folder="board"),
                     model_args=LLAMA3_FLAVORS["debugmodel"], seq_len=32)
    log.resumed(2)
    for step in range(3, 7):
        log.maybe_log(step, step == 6, {**RECORD, "loss": 3.0 - step / 10})
        log.committed(2 if step < 4 else (4 if step < 6 else 6))  # 2 is the resumed step, not a save
    log.close()
    tags = scalars(tmp_path / "board")
    for tag in ("loss", "lr", "grad_norm", "tokens_per_second", "memory_gib", "tflops"):
        assert [s for s, _ in tags[tag]] == [3, 4, 5, 6], tag
    assert [v for _, v in tags["loss"]] == pytest.approx([2.7, 2.6, 2.5, 2.4])
    assert tags["checkpoint/saved_step"] == [(4, 4.0), (6, 6.0)]
    assert tags["checkpoint/resumed_step"] == [(2, 2.0)]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["resumed_from"] == 2 and records[2]["saved_steps"] == [4]
    assert not any("saved_steps" in r for r in records[:2])


def test_save_for_all_ranks_writes_a_rank_folder(tmp_path):
    log = MetricsLog(str(tmp_path), 1, Metrics(enable_tensorboard=True, save_for_all_ranks=True))
    log.maybe_log(1, True, RECORD)
    log.close()
    assert [s for s, _ in scalars(tmp_path / "tb" / "rank_0")["loss"]] == [1]


def test_a_training_job_writes_tensorboard_events(train, tmp_path):
    trainer = train("--metrics.enable_tensorboard", "--training.steps", "4", "--checkpoint.interval", "2",
                    dump=tmp_path / "run")
    trainer.metrics.close()
    tags = scalars(tmp_path / "run" / "tb")
    assert [s for s, _ in tags["loss"]] == [1, 2, 3, 4]
    assert {"lr", "grad_norm", "tokens_per_second", "memory_gib", "tflops"} <= set(tags)
    assert [s for s, _ in tags["checkpoint/saved_step"]] == [2, 4]


def test_missing_tensorboard_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"tensorboard package is not installed; pip install 'savepoint\[metrics\]'"):
        MetricsLog(str(tmp_path), 1, Metrics(enable_tensorboard=True))


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_missing_wandb_is_one_clear_line(tmp_path):
    with pytest.raises(ConfigError, match="wandb package is not installed; pip install wandb") as e:
        MetricsLog(str(tmp_path), 1, Metrics(enable_wandb=True))
    assert "\n" not in str(e.value)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_runs_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    log = MetricsLog(str(tmp_path), 1, Metrics(enable_wandb=True))
    log.maybe_log(1, True, RECORD)
    log.close()
    assert os.environ["WANDB_MODE"] == "offline" and any((tmp_path / "wandb").rglob("offline-run-*"))


@pytest.fixture
def cli_handler():
    """Removes the handler ``cli.setup_logging`` adds (its stream is the test's) when the test ends."""
    yield
    root = logging.getLogger("savepoint")
    for handler in [h for h in root.handlers if getattr(h, "savepoint_cli", False)]:
        root.removeHandler(handler)


def _log_a_warning(stream, monkeypatch, color: bool) -> None:
    monkeypatch.setattr(sys, "stdout", stream)
    cli.setup_logging()
    cli.set_color(color)
    logging.getLogger("savepoint.metrics").warning("hello")
    stream.flush()


def test_level_names_are_colored_on_a_terminal_unless_disabled(monkeypatch, cli_handler):
    leader, follower = pty.openpty()
    try:
        with open(follower, "w", closefd=False) as tty:
            for color in (True, False):
                _log_a_warning(tty, monkeypatch, color)
        out = ""
        while out.count("hello") < 2 and select.select([leader], [], [], 5)[0]:
            out += os.read(leader, 65536).decode()
    finally:
        os.close(leader)
        os.close(follower)
    colored, plain = [line for line in out.splitlines() if "hello" in line]
    assert "\033[33mWARNING\033[0m" in colored
    assert "\033[" not in plain and " WARNING " in plain


def test_never_color_when_not_a_terminal(monkeypatch, cli_handler):
    stream = io.StringIO()
    _log_a_warning(stream, monkeypatch, True)
    assert "\033[" not in stream.getvalue() and " WARNING " in stream.getvalue()
