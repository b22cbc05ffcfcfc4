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
# AdamW's fused kernel: a 16-token step of the debug model spends ~40% of its CPU time in the
# optimizer, which the fused kernel nearly halves (the 501-step run below: ~40% faster). The saved
# optimizer state is the same; the default (foreach) implementation trains in every other test.
FUSED = ["--optimizer.implementation", "fused"]


def config_with(tmp_path: Path, name: str, checkpoint_block: str) -> Path:
    """The debug config with its [checkpoint] table replaced by ``checkpoint_block``."""
    debug = (ROOT / "configs/debug_model.toml").read_text()
    head, rest = debug.split("[checkpoint]\n", 1)
    tail = rest[rest.index("\n[") :]
    path = tmp_path / f"{name}.toml"
    path.write_text(f"{head}[checkpoint]\n{checkpoint_block}{tail}")
    return path


def run_train(config: Path | None, *args: str, dump: Path, ngpu: int | str = 1) -> subprocess.CompletedProcess:
    # One torch thread per process: on a busy 2-core machine, spinning OpenMP threads slowed a
    # 16-token step from milliseconds to a second.
    env = {"OMP_NUM_THREADS": "1", **os.environ, "SAVEPOINT_PYTHON": sys.executable, "NGPU": str(ngpu)}
    if config is not None:
        env["CONFIG_FILE"] = str(config)
    cmd = ["./run_train.sh", "--job.dump_folder", str(dump), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def step_layout(step_dir: Path) -> list[str]:
    return sorted(p.name for p in step_dir.iterdir())


def test_basic_then_resume_from_step_500(tmp_path):
    dump = tmp_path / "out"
    basic = config_with(tmp_path, "basic", BASIC)
    # 501 steps: step-500 is an interval save (full), step-501 the final save (model-only by default).
    ok(run_train(basic, *TINY, *FUSED, "--training.steps", "501", dump=dump))
    assert sorted(p.name for p in (dump / "checkpoint").iterdir()) == ["step-500", "step-501"]
    for step in (500, 501):
        assert step_layout(dump / f"checkpoint/step-{step}") == [".metadata", "__0_0.distcp", "manifest.json"]

    resume = config_with(tmp_path, "resume", BASIC + RESUME)
    proc = ok(run_train(resume, *TINY, *FUSED, "--training.steps", "501", dump=dump))
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


def test_bad_ngpu_is_one_line(tmp_path):
    for ngpu in ("0", "-1", "abc", "2x"):
        proc = run_train(None, "--training.steps", "1", dump=tmp_path, ngpu=ngpu)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.strip().splitlines() == [
            f"error: NGPU={ngpu}: give the number of training processes per node (one per GPU; 1 or more), "
            "e.g. NGPU=2 ./run_train.sh, or leave NGPU unset for 1"], proc.stderr
        assert not tmp_path.joinpath("metrics.jsonl").exists()


def test_help_lists_every_option(tmp_path):
    proc = ok(run_train(None, "--help", dump=tmp_path))
    flags = ("--checkpoint.keep_latest_k", "--checkpoint.exclude_from_loading", "--parallelism.tensor_parallel_degree")
    for flag in flags:
        assert flag in proc.stdout
    assert "Keep the newest k committed steps" in proc.stdout


# The seed's "Creating Seed Checkpoints" command, flag for flag.
SEED_COMMAND = ["--checkpoint.enable", "--checkpoint.create_seed_checkpoint",
                "--parallelism.data_parallel_replicate_degree", "1", "--parallelism.data_parallel_shard_degree", "1",
                "--parallelism.tensor_parallel_degree", "1", "--parallelism.pipeline_parallel_degree", "1",
                "--parallelism.context_parallel_degree", "1", "--parallelism.expert_parallel_degree", "1"]


def test_seed_checkpoint_then_two_processes(tmp_path):
    dump = tmp_path / "out"
    ok(run_train(ROOT / "configs/debug_model.toml", *SEED_COMMAND, dump=dump))
    assert sorted(p.name for p in (dump / "checkpoint").iterdir()) == ["step-0"]
    meta = FileSystemReader(str(dump / "checkpoint/step-0")).read_metadata().state_dict_metadata
    assert "output.weight" in meta and not any(k.startswith("optimizer") for k in meta)

    proc = ok(run_train(None, *TINY, "--checkpoint.enable", "--training.steps", "3", "--checkpoint.interval", "2",
                        "--checkpoint.no_last_save_model_only", dump=dump, ngpu=2))
    assert "step-0 is a seed checkpoint" in proc.stdout
    assert "FSDP 2" in proc.stdout
    for step in (2, 3):
        assert step_layout(dump / f"checkpoint/step-{step}") == [
            ".metadata", "__0_0.distcp", "__1_0.distcp", "manifest.json"]
    assert sorted(losses(dump)) == [1, 2, 3]


def test_bad_layouts_fail_before_launch(tmp_path):
    cases = [
        (2, ["--parallelism.data_parallel_shard_degree", "1"],
         "the parallel degrees multiply to 1 (data_parallel_replicate_degree=1 x data_parallel_shard_degree=1 x "
         "tensor_parallel_degree=1) but the world size is 2"),
        (2, ["--parallelism.data_parallel_replicate_degree", "3"], "does not divide the world size 2"),
        (2, ["--checkpoint.enable", "--checkpoint.create_seed_checkpoint"], "launch it with NGPU=1"),
        (1, ["--checkpoint.create_seed_checkpoint"], "needs --checkpoint.enable"),
        (1, ["--checkpoint.enable", "--checkpoint.create_seed_checkpoint", "--parallelism.tensor_parallel_degree",
             "2"], "set --parallelism.tensor_parallel_degree 1"),
        (3, ["--parallelism.tensor_parallel_degree", "3"],
         "--parallelism.tensor_parallel_degree=3 does not divide the attention head count (n_heads=16"),
        (8, ["--parallelism.pipeline_parallel_degree", "8", "--parallelism.pipeline_parallel_schedule",
             "Interleaved1F1B"], "Interleaved1F1B at --parallelism.pipeline_parallel_degree=8 uses 16 stage(s): 16 "
         "stages is more than the model's 6 layers"),
        (2, ["--parallelism.pipeline_parallel_degree", "2", "--parallelism.pipeline_parallel_microbatch_size", "3"],
         "--training.local_batch_size=8 is not divisible by --parallelism.pipeline_parallel_microbatch_size=3"),
    ]
    for ngpu, args, message in cases:
        proc = run_train(None, *args, dump=tmp_path, ngpu=ngpu)
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert "rank" not in proc.stdout  # rejected by the check, before torchrun started any process
