"""The in-memory tier at two processes (FSDP 2, gloo): the ranks agree on the newest step every rank has.

One torchrun launch runs every scenario of ``tests/memory_worker.py``; the tests check what it wrote.
A restart at one process from the two-process job is in this process.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from savepoint.checkpoint.storage import CheckpointFolder
from savepoint.train import Trainer
from tests.conftest import ROOT, make_config
from tests.memory_worker import ARGS, SCENARIOS, STEPS, bind_run_file


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("memory2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv_backend", "c10d",
           "--rdzv_endpoint", "localhost:0", str(ROOT / "tests" / "memory_worker.py"), str(base)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"torchrun failed:\n{out.stdout[-4000:]}\n{out.stderr[-6000:]}"
    return {**json.loads((base / "results.json").read_text()), "base": base, "log": out.stdout + out.stderr}


@pytest.mark.parametrize(("scenario", "loaded", "kept"), [
    ("newer", 7, ["step-6", "step-7"]),  # RAM is newer than disk (step 4): it is loaded
    ("rank1_lost_newest", 6, ["step-6", "step-7"]),  # rank 1 died writing step 7: both load step 6
    ("rank1_damaged", 4, ["step-6", "step-7"]),  # rank 1's copies fail their checksums: both load disk
    ("rank1_rebooted", 4, ["step-6", "step-7"]),  # rank 1's node lost its RAM: both load disk
    ("pinned", 6, ["step-5", "step-6"]),  # with async_with_pinned_mem durable saves (a writer process)
    ("async", 7, ["step-6", "step-7"]),  # with async durable saves
    ("tp", 6, ["step-5", "step-6"]),  # TP(2): each rank saves its tensor-parallel shards
    ("pp", 6, ["step-5", "step-6"]),  # PP(2): each rank saves its stage
])
def test_restart_loads_the_newest_step_every_rank_has(results, scenario, loaded, kept):
    got = results["results"][scenario]
    assert got["kept"] == kept and got["same_on_every_rank"]
    assert got["loaded"] == loaded
    assert got["equal"], "the final model and optimizer differ from the uninterrupted run's"
    expected, losses = results["straights"].get(scenario, results["straight"]), results["losses"][scenario]
    assert [losses[str(s)] for s in range(1, STEPS + 1)] == [expected[str(s)] for s in range(1, STEPS + 1)]
    assert not got["ram_left"], "a job that ended cleanly leaves no RAM copy behind"


def test_ranks_skip_the_same_due_saves_when_the_writer_falls_behind(results):
    got = results["results"]["skipping"]
    assert got["kept"] and got["same_on_every_rank"], got
    newest = int(got["kept"][-1].split("-")[1])
    assert got["loaded"] == (newest if newest >= 4 else 4) and got["equal"]
    assert "skipped: some rank is still writing the one before" in results["log"]


def test_fallbacks_are_logged(results):
    assert "the in-memory checkpoint of step 7 cannot be used" in results["log"]
    assert "rank(s) 1 do not have it" in results["log"]
    assert len(SCENARIOS) == 9


def test_a_restart_at_another_layout_ignores_the_ram_copies(results, tmp_path, caplog):
    """Two-process RAM copies hold FSDP shards: a one-process restart uses the durable step (resharded)."""
    dump = tmp_path / "job"
    shm = tmp_path / "shm"
    args = ["--checkpoint.enable", "--checkpoint.memory_interval", "1", "--checkpoint.memory_folder", str(shm)]
    src = results["base"] / "newer" / "checkpoint"
    job = dump / "checkpoint"
    job.mkdir(parents=True)
    for step in (4,):
        subprocess.run(["cp", "-a", str(src / f"step-{step}"), str(job)], check=True)
    (job / ".savepoint.run").write_text((src / ".savepoint.run").read_text().replace(
        str(results["base"] / "newer" / "shm"), str(shm)))
    bind_run_file(job)  # the two-process job's run, as if it restarted here at one process
    run_id = json.loads((job / ".savepoint.run").read_text())["run"]
    two_proc_ram = shm / run_id / "rank-0"
    two_proc_ram.mkdir(parents=True)
    stale = results["base"] / "stale-rank-0"
    assert stale.is_dir(), "the worker keeps one two-process RAM step for this test"
    subprocess.run(["cp", "-a", str(stale / "step-6"), str(two_proc_ram)], check=True)
    with caplog.at_level(logging.INFO):
        trainer = Trainer(make_config(dump, *ARGS, *args, "--training.local_batch_size", "4"))
        trainer.train(stop_after=5)
        trainer.checkpointer.memory.finish()
        trainer.checkpointer.lock.release()
    assert trainer.loaded_step == 4
    assert "removing in-memory step 6 of rank 0 (written by another layout, run or step" in caplog.text
    assert CheckpointFolder(two_proc_ram).committed_steps() == [5]  # its own copy of step 5 only
