"""Every checkpoint feature at pipeline parallelism PP(2) (gloo, CPU): saves, verify, fallback, retention,
model-only bf16 export, async saves, partial loads, preemption and the folder lock.

One module fixture runs every PP job once, in a single torchrun launch (``tests/pp_features_worker.py``);
a 1-process job in this process gives the key set a PP checkpoint must have. The tests check what
they wrote.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from savepoint.checkpoint.lock import LOCK_NAME, FolderLock
from savepoint.checkpoint.reader import VerifyingReader
from savepoint.checkpoint.storage import CheckpointFolder
from savepoint.checkpoint.verify import verify_step
from tests import pp_features_worker as worker
from tests.conftest import ROOT, losses, make_config, run_cli

pytestmark = pytest.mark.distributed

SCENARIOS = ["straight", "async:async", "async:async_with_pinned_mem", "model_only", "fallback", "partial",
             "preempt", "locked"]
MODES = ["async", "async_with_pinned_mem"]
PP_LAYOUT = {"data_parallel_replicate_degree": 1, "data_parallel_shard_degree": 1, "pipeline_parallel_degree": 2,
             "tensor_parallel_degree": 1, "world_size": 2}
RANK_FILES = ["__0_0.distcp", "__1_0.distcp"]
NOT_MODEL = ("optimizer", "lr_scheduler", "dataloader", "train_state")


def torchrun(base: Path, scenarios: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv_backend", "c10d",
           "--rdzv_endpoint", "localhost:0", str(ROOT / "tests" / "pp_features_worker.py"), str(base),
           ",".join(scenarios)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("pp")
    held = base / "locked" / "checkpoint"
    held.mkdir(parents=True)
    holder = FolderLock(held)  # this process plays a job that holds the folder
    holder.acquire()
    try:
        torchrun(base, SCENARIOS)
    finally:
        holder.release()
    return base


@pytest.fixture(scope="module")
def one_process_keys(tmp_path_factory) -> set[str]:
    """The keys of a full checkpoint of the same job trained in one process."""
    from savepoint.train import Trainer

    dump = tmp_path_factory.mktemp("one")
    trainer = Trainer(make_config(dump, "--training.local_batch_size", "4", "--training.steps", "1"))
    trainer.train()
    trainer.checkpointer.close()
    return stored_keys(dump / "checkpoint" / "step-1")


def stored_keys(step_dir: Path) -> set[str]:
    return set(VerifyingReader.for_step(step_dir).read_metadata().state_dict_metadata)


def saved_tensors(step_dir: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP step, read back in one process, under dotted keys."""
    out = tmp / f"{step_dir.parent.parent.name}-{step_dir.name}.pt"
    dcp_to_torch_save(step_dir, out)
    return flatten(torch.load(out, weights_only=False))


def flatten(tree: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, torch.Tensor):
            flat[f"{prefix}{key}"] = value
    return flat


def assert_identical(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == expected.keys(), f"{what}: keys differ: {sorted(got.keys() ^ expected.keys())[:5]}"
    bad = [k for k in expected if expected[k].dtype != got[k].dtype or not torch.equal(expected[k], got[k])]
    assert not bad, f"{what}: {len(bad)} tensors differ, e.g. {bad[:3]}"


def final_state(base: Path, run: str, name: str = "final.pt") -> dict[str, torch.Tensor]:
    state = torch.load(base / run / name, weights_only=False)
    return {**state["model"], **{f"optimizer.{k}": v for k, v in state["optimizer"].items()
                                 if isinstance(v, torch.Tensor)}}


def result(base: Path, run: str) -> dict:
    return json.loads((base / run / "result.json").read_text())


def rank_logs(base: Path, run: str, log: str = "") -> list[str]:
    return [(base / run / f"{log}rank{r}.log").read_text() for r in (0, 1)]


def metrics(base: Path, run: str) -> dict[int, dict]:
    records = [json.loads(line) for line in (base / run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records}


def flip_bit(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 3)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x01]))


def no_leftovers(root: Path) -> bool:
    return not [p for p in root.iterdir() if p.name.startswith(".") and p.name != LOCK_NAME]


# ------------------------------------------------------------------------------------- saving


def test_interval_and_final_saves_are_committed_with_the_one_process_keys(base, one_process_keys):
    root = base / "straight" / "checkpoint"
    assert CheckpointFolder(root).committed_steps() == [2, 4, 5]  # every 2 steps, and the last
    assert no_leftovers(root) and not (root / LOCK_NAME).exists()  # released at close
    for step in (2, 4, 5):
        step_dir = root / f"step-{step}"
        manifest = json.loads((step_dir / "manifest.json").read_text())
        assert manifest["kind"] == "full" and manifest["step"] == step and manifest["layout"] == PP_LAYOUT
        assert sorted(manifest["files"]) == [".metadata", *RANK_FILES]  # each stage wrote its own file
        assert stored_keys(step_dir) == one_process_keys, sorted(stored_keys(step_dir) ^ one_process_keys)[:5]
    assert any(k.startswith("optimizer.state.layers.5.") for k in one_process_keys)  # both stages' state


def test_savepoint_verify_passes_on_a_pp_step_and_names_a_damaged_file(base, tmp_path, capsys):
    step = tmp_path / "step-5"
    shutil.copytree(base / "straight" / "checkpoint" / "step-5", step)
    code, out, err = run_cli(["verify", str(step)], capsys)
    assert code == 0 and f"{step}: OK, checksums match" in out, out + err
    flip_bit(step / "__0_0.distcp")
    code, out, err = run_cli(["verify", str(step)], capsys)
    assert code == 1
    assert f"{step}: CORRUPT: {step / '__0_0.distcp'} is corrupt: bytes [" in out, out
    assert "1 of 1 step(s) failed verification" in err
    assert verify_step(step).problems[0].startswith(f"{step / '__0_0.distcp'} is corrupt")


def test_auto_resume_falls_back_past_a_damaged_latest_pp_step(base):
    """Step 5's second-stage file is damaged: both ranks log CORRUPT CHECKPOINT, load step 4, redo step 5."""
    state = result(base, "fallback")
    assert state["loaded"] == [4, 4]
    assert all(n > 0 for n in state["optimizer_entries"])  # a full load: the optimizer state came back
    damaged = base / "fallback" / "checkpoint" / "step-5" / worker.DAMAGED
    for log in rank_logs(base, "fallback"):
        assert f"CORRUPT CHECKPOINT: loading {damaged.parent} failed: rank 1: CorruptCheckpointError: {damaged} " \
               "is corrupt" in log
        assert f"loaded {damaged.parent.parent / 'step-4'} (full)" in log
        assert "newer steps" not in log  # step 5 is the corrupt one it just skipped, not an earlier run's
    assert metrics(base, "fallback")[5]["loss"] == losses(base / "straight")[5]
    assert_identical(final_state(base, "straight"), final_state(base, "fallback"), "fallback vs straight")
    assert verify_step(damaged.parent).ok  # step 5 was saved again, intact


def test_retention_keeps_the_newest_steps_at_pp(base):
    """keep_latest_k=2: step 2 is deleted once step 5 is committed, sync (fallback run) and async alike."""
    for run in ("fallback", *MODES):
        root = base / run / "checkpoint"
        assert CheckpointFolder(root).committed_steps() == [4, 5], run
        assert no_leftovers(root), sorted(p.name for p in root.iterdir())
    assert (base / "straight" / "checkpoint" / "step-2").is_dir()  # keep_latest_k=10 kept it


def test_last_save_model_only_in_bfloat16_at_pp(base, one_process_keys):
    step = base / "model_only" / "checkpoint" / "step-3"
    manifest = json.loads((step / "manifest.json").read_text())
    assert manifest["kind"] == "model_only" and manifest["export_dtype"] == "bfloat16"
    assert manifest["layout"] == PP_LAYOUT and sorted(manifest["files"]) == [".metadata", *RANK_FILES]
    saved = saved_tensors(step, base)
    weights = torch.load(base / "model_only" / "final.pt", weights_only=True)  # float32, from both stages
    model_keys = {k for k in one_process_keys if not k.startswith(NOT_MODEL)}
    assert saved.keys() == weights.keys() == model_keys
    assert all(w.dtype == torch.float32 for w in weights.values())
    assert_identical({k: w.to(torch.bfloat16) for k, w in weights.items()}, saved, "bf16 export vs weights cast")


@pytest.mark.parametrize("mode", MODES)
def test_async_saves_at_pp_equal_sync_saves(base, mode):
    """Step 4 was written in the background while step 5 trained: the same bytes as the sync run's."""
    assert result(base, mode)["step"] == [5, 5]
    assert metrics(base, mode).keys() == metrics(base, "straight").keys()
    for step in (4, 5):
        step_dir = base / mode / "checkpoint" / f"step-{step}"
        assert sorted(p.name for p in step_dir.glob("*.distcp")) == RANK_FILES
        assert verify_step(step_dir).ok
        assert_identical(saved_tensors(base / "straight" / "checkpoint" / f"step-{step}", base),
                         saved_tensors(step_dir, base), f"{mode} step {step} vs sync step {step}")


# -------------------------------------------------------------------------------------- loading


def test_load_step_excluding_dataloader_and_optimizer_at_pp(base):
    """--checkpoint.load_step 4 (step 5 is newer) with --checkpoint.exclude_from_loading dataloader,optimizer."""
    state = result(base, "partial")
    assert state["loaded"] == [4, 4] and state["train_step"] == [4, 4]  # step 4, not the newest
    assert state["optimizer_entries"] == [0, 0]  # a fresh optimizer on both stages
    assert state["lr_steps"] == [4, 4]  # the schedule was loaded
    assert state["sample_index"] == [0, 0]  # the data starts over
    saved = saved_tensors(base / "straight" / "checkpoint" / "step-4", base)
    loaded = torch.load(base / "partial" / "loaded.pt", weights_only=False)
    assert loaded["optimizer"] == {}
    assert_identical({k: v for k, v in saved.items() if k in loaded["model"]}, loaded["model"], "step-4 weights")
    assert len(loaded["model"]) == len([k for k in saved if not k.startswith(NOT_MODEL)])
    straight, partial = metrics(base, "straight"), metrics(base, "partial")
    assert sorted(partial) == [5]
    assert partial[5]["samples"] == straight[1]["samples"] == [0, 4] and straight[5]["samples"] == [16, 20]
    assert partial[5]["lr"] == straight[5]["lr"]
    for log in rank_logs(base, "partial"):
        assert "loading step 4 while newer steps [5] exist" in log
        assert "step-4 (full, excluded optimizer,dataloader)" in log


# ------------------------------------------------------------------------------ preemption, lock


def test_sigterm_to_one_rank_stops_every_stage_after_the_same_step(base):
    state = result(base, "preempt")
    assert state["stopped"] == [worker.PREEMPTED_AT] * 2 and state["resumed_from"] == [worker.PREEMPTED_AT] * 2
    rank0, rank1 = rank_logs(base, "preempt")
    assert "SIGTERM: finishing the current step" in rank1 and "SIGTERM" not in rank0  # rank 1 alone got it
    for log in (rank0, rank1):
        assert f"preempted at step {worker.PREEMPTED_AT}: checkpoint step-{worker.PREEMPTED_AT} committed" in log
    for log in rank_logs(base, "preempt", "resumed."):
        assert f"loaded {base / 'preempt' / 'checkpoint' / 'step-3'} (full)" in log
    assert CheckpointFolder(base / "preempt" / "checkpoint").committed_steps() == [3, 5]


def test_resume_after_preemption_at_pp_is_bit_exact(base):
    expected, got = losses(base / "straight"), losses(base / "preempt")
    assert [got[s] for s in range(1, 6)] == [expected[s] for s in range(1, 6)]
    assert_identical(final_state(base, "straight"), final_state(base, "preempt"), "preempted+resumed vs straight")


def test_a_pp_job_holds_its_folder_against_another_job(base):
    state = result(base, "straight")
    root = base / "straight" / "checkpoint"
    assert state["other_exit"] == 1
    assert f"checkpoint folder {root} is in use by another job: pid {state['pid']} on host " in state["other_error"]


def test_a_second_pp_job_on_a_held_folder_is_refused_on_both_ranks(base):
    errors = result(base, "locked")["errors"]
    root = base / "locked" / "checkpoint"
    for error in errors:
        assert error is not None and error.startswith("CheckpointError: checkpoint folder ")
        assert f"{root} is in use by another job: pid {os.getpid()} on host " in error
    assert sorted(p.name for p in root.iterdir()) == []  # nothing written, the holder's lock file removed
