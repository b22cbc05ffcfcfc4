"""The seed's commands and config blocks, run as a user would: ``./run_train.sh`` under torchrun."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader

from tests.conftest import ROOT, losses

# [checkpoint] blocks exactly as the seed (docs/checkpoint.md) writes them.
BASIC = 'enable = true\nfolder = "checkpoint"\ninterval = 500\n'
MODEL_ONLY = (
    'enable = true\nlast_save_model_only = true\nexport_dtype = "bfloat16"  # Optional: export in lower precision\n'
)
EXCLUDING = 'enable = true\nexclude_from_loading = ["data_loader", "lr_scheduler"]\n'
RESUME = "load_step = 500  # Resume from step 500\n"
TINY = ["--training.seq_len", "16", "--training.local_batch_size", "1"]


def config_with(tmp_path: Path, name: str, checkpoint_block: str) -> Path:
    """The debug config with its [checkpoint] table replaced by ``checkpoint_block``."""
    debug = (ROOT / "configs/debug_model.toml").read_text()
    head, rest = debug.split("[checkpoint]\n", 1)
    tail = rest[rest.index("\n[") :]
    path = tmp_path / f"{name}.toml"
    path.write_text(f"{head}[checkpoint]\n{checkpoint_block}{tail}")
    return path


def run_train(config: Path | None, *args: str, dump: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SAVEPOINT_PYTHON": sys.executable}
    if config is not None:
        env["CONFIG_FILE"] = str(config)
    cmd = ["./run_train.sh", "--job.dump_folder", str(dump), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def step_layout(step_dir: Path) -> list[str]:
    return sorted(p.name for p in step_dir.iterdir())


def test_basic_then_resume_from_step_500(tmp_path):
    dump = tmp_path / "out"
    basic = config_with(tmp_path, "basic", BASIC)
    # 501 steps: step-500 is an interval save (full), step-501 the final save (model-only by default).
    ok(run_train(basic, *TINY, "--training.steps", "501", dump=dump))
    assert sorted(p.name for p in (dump / "checkpoint").iterdir()) == ["step-500", "step-501"]
    for step in (500, 501):
        assert step_layout(dump / f"checkpoint/step-{step}") == [".metadata", "__0_0.distcp", "manifest.json"]

    resume = config_with(tmp_path, "resume", BASIC + RESUME)
    proc = ok(run_train(resume, *TINY, "--training.steps", "501", dump=dump))
    assert re.search(r"loaded \S+/step-500 \(full\)", proc.stdout)
    assert "from step 500 to 501" in proc.stdout
    assert sorted(losses(dump)) == list(range(1, 502))


def test_save_model_only_bf16(tmp_path):
    dump = tmp_path / "out"
    ok(run_train(config_with(tmp_path, "model_only", MODEL_ONLY), *TINY, "--training.steps", "3", dump=dump))
    step_dir = dump / "checkpoint/step-3"
    assert step_layout(step_dir) == [".metadata", "__0_0.distcp", "manifest.json"]
    meta = FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata
    assert not any(k.split(".")[0] in ("optimizer", "lr_scheduler", "dataloader", "train_state") for k in meta)
    assert {m.properties.dtype for m in meta.values()} == {torch.bfloat16}


def test_excluding_keys_toml_and_cli(tmp_path):
    dump = tmp_path / "out"
    ok(run_train(None, *TINY, "--checkpoint.enable", "--checkpoint.interval", "5", "--training.steps", "10",
                 dump=dump))
    excluding = config_with(tmp_path, "excluding", EXCLUDING)
    proc = ok(run_train(excluding, *TINY, "--training.steps", "12", dump=dump))
    assert "excluded lr_scheduler,dataloader" in proc.stdout or "excluded dataloader,lr_scheduler" in proc.stdout
    cli = ok(run_train(None, *TINY, "--checkpoint.enable", "--training.steps", "12",
                       "--checkpoint.load_step", "10", "--checkpoint.exclude_from_loading", "data_loader,lr_scheduler",
                       dump=dump))
    assert "excluded" in cli.stdout and "from step 10 to 12" in cli.stdout


def test_bad_input_is_one_line_and_nonzero(tmp_path):
    proc = run_train(None, "--checkpoint.intervall", "5", dump=tmp_path)
    assert proc.returncode != 0
    assert "did you mean --checkpoint.interval?" in proc.stderr
    assert "Traceback" not in proc.stderr
    missing = run_train(None, *TINY, "--checkpoint.enable", "--checkpoint.load_step", "7", dump=tmp_path)
    assert missing.returncode != 0
    assert "--checkpoint.load_step=7: no committed step-7" in missing.stderr + missing.stdout
    assert "Traceback" not in missing.stderr


def test_help_lists_every_option(tmp_path):
    proc = ok(run_train(None, "--help", dump=tmp_path))
    flags = ("--checkpoint.keep_latest_k", "--checkpoint.exclude_from_loading", "--parallelism.tensor_parallel_degree")
    for flag in flags:
        assert flag in proc.stdout
    assert "Keep the newest k committed steps" in proc.stdout
