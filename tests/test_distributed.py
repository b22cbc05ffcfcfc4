"""FSDP2, TP, HSDP and resharding on gloo: seed checkpoints, the reshard matrix, dataloader resharding.

One module fixture runs every job once: 1-process jobs in this process, 2-process jobs in a single
torchrun launch, 4-process (FSDP 2 x TP 2) jobs in another; the tests then check what they wrote.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests import dist_worker as worker
from tests.conftest import ROOT, losses

pytestmark = pytest.mark.distributed

TWO = ["straight:fsdp", "straight:tp", "straight:hsdp", "resume:fsdp>fsdp", "resume:one>fsdp", "resume:one>tp",
       "resume:fsdp>tp", "resume:tp>fsdp", "resume:tp>tp", "seed:fsdp", "seed:tp", "seed:hsdp", "resume:hsdp>tp",
       "failed_save", "failed_prepare", "hf_final", "hf_load:tp",
       "async:async", "async:async_with_pinned_mem"]
FOUR = ["resume:fsdp>fsdp_tp", "seed:fsdp_tp"]
# Losses of a resharded continuation against the same-layout one (measured: at most 9.5e-7): sums
# in a different order (sharded matmuls, reduce-scatter) change the last bits of float32 results.
LOSS_TOLERANCE = 1e-5
# A continuation at another layout follows that layout's float32 summation order from the loaded
# (bit-identical) weights; over 5 steps at the peak learning rate the difference grows to ~2.4e-5.
CONTINUATION_TOLERANCE = 1e-4


def torchrun(base: Path, nproc: int, scenarios: list[str], worker: str = "dist_worker.py") -> None:
    """Run ``scenarios`` of ``tests/<worker>`` in one torchrun launch of ``nproc`` gloo processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--rdzv_backend", "c10d",
           "--rdzv_endpoint", "localhost:0", str(ROOT / "tests" / worker), str(base), ",".join(scenarios)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Iterator[Path]:
    base = tmp_path_factory.mktemp("dist")
    with worker.one_thread():
        worker.make_seed(base)
        worker.straight(base, "one")
    torchrun(base, 2, TWO)
    torchrun(base, 4, FOUR)
    with worker.one_thread():
        for scenario in ("resume:fsdp>one", "resume:tp>one", "resume:one>one", "resume:hsdp>one", "seed:one"):
            worker.run_scenario(base, scenario)
    yield base
    forget_saved_tensors()


def saved_tensors(step_dir: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """Every tensor in a DCP checkpoint, read back in one process, flattened to dotted keys.

    Many tests compare against the same committed step (a reshard source, the seed): each is
    converted once, while the tests that use it run (the tests only read the tensors)."""
    return dict(_converted(step_dir.resolve(), tmp))


def forget_saved_tensors() -> None:
    """Drop the steps ``saved_tensors`` keeps (at the end of a module whose tests use them)."""
    _converted.cache_clear()


@functools.lru_cache(maxsize=4)  # the tests of one source step run one after another
def _converted(step_dir: Path, tmp: Path) -> dict[str, torch.Tensor]:
    out = tmp / (step_dir.parent.parent.name + ".pt")
    dcp_to_torch_save(step_dir, out)
    return flatten(torch.load(out, weights_only=False))


def flatten(tree, prefix: str = "") -> dict[str, torch.Tensor]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, torch.Tensor):
            flat[name] = value
    return flat


def assert_identical(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == expected.keys(), f"{what}: keys differ: {sorted(got.keys() ^ expected.keys())[:5]}"
    bad = [k for k in expected if expected[k].dtype != got[k].dtype or not torch.equal(expected[k], got[k])]
    assert not bad, f"{what}: {len(bad)} tensors differ, e.g. {bad[:3]}"


def loaded_state(base: Path, run: str) -> dict[str, torch.Tensor]:
    state = torch.load(base / run / "loaded.pt", weights_only=False)
    flat = dict(state["model"])
    flat.update({f"optimizer.{k}": v for k, v in state["optimizer"].items() if isinstance(v, torch.Tensor)})
    return flat


# --------------------------------------------------------------------------------------------- seed


def test_seed_checkpoint_is_model_only_step_0(base):
    step0 = base / "seed" / "checkpoint" / "step-0"
    manifest = json.loads((step0 / "manifest.json").read_text())
    assert manifest["kind"] == "seed" and manifest["layout"]["world_size"] == 1
    tensors = saved_tensors(step0, base)
    assert not any(k.startswith(("optimizer", "lr_scheduler", "dataloader", "train_state")) for k in tensors)
    assert all(t.dtype == torch.float32 for t in tensors.values())


@pytest.mark.parametrize("layout", ["one", "fsdp", "tp", "hsdp", "fsdp_tp"])
def test_seed_checkpoint_loads_bit_identical_at_every_layout(base, layout):
    seed = saved_tensors(base / "seed" / "checkpoint" / "step-0", base)
    got = torch.load(base / f"seed_to_{layout}" / "loaded.pt")
    assert_identical(seed, got, f"seed checkpoint loaded at {layout}")
    # the seed was made with --training.seed 7; these runs use seed 0, so the load really happened
    own_init = torch.load(base / "one" / "init.pt")
    assert not torch.equal(own_init["output.weight"], got["output.weight"])


@pytest.mark.parametrize("layout", ["fsdp", "tp", "hsdp"])
def test_init_without_seed_checkpoint_is_layout_independent(base, layout):
    """The seed doc warns that init differs across layouts; here it does not: each part is initialised
    full-size on the CPU from one seeded generator, then sharded."""
    assert_identical(torch.load(base / "one" / "init.pt"), torch.load(base / layout / "init.pt"),
                     f"init at {layout} vs 1 process")


# -------------------------------------------------------------------------------------- resharding

MATRIX = [(s, d) for s in ("one", "fsdp", "tp") for d in ("one", "fsdp", "tp")] + [
    ("fsdp", "fsdp_tp"), ("hsdp", "one"), ("hsdp", "tp")]


@pytest.mark.parametrize("source,layout", MATRIX)
def test_reshard_load_is_bit_identical(base, source, layout):
    saved = saved_tensors(base / source / "checkpoint" / "step-5", base)
    saved = {k: v for k, v in saved.items() if not k.startswith(("train_state", "lr_scheduler", "dataloader"))}
    got = loaded_state(base, f"{source}_to_{layout}")
    assert_identical(saved, got, f"{source} step 5 loaded at {layout}")
    assert any(k.startswith("optimizer.state.") and k.endswith("exp_avg_sq") for k in got)


@pytest.mark.parametrize("source,layout", MATRIX)
def test_training_continues_after_reshard(base, source, layout):
    same_layout = losses(base / source)
    resharded = losses(base / f"{source}_to_{layout}")
    assert sorted(resharded) == list(range(6, 11))
    assert abs(resharded[6] - same_layout[6]) <= LOSS_TOLERANCE, (resharded[6], same_layout[6])  # the first step
    for step in range(7, 11):
        assert abs(resharded[step] - same_layout[step]) <= CONTINUATION_TOLERANCE, (step, resharded[step],
                                                                                     same_layout[step])


@pytest.mark.parametrize("layout", ["one", "fsdp", "tp"])
def test_same_layout_resume_is_bit_exact(base, layout):
    straight, resumed = losses(base / layout), losses(base / f"{layout}_to_{layout}")
    assert [resumed[s] for s in range(6, 11)] == [straight[s] for s in range(6, 11)]
    a = torch.load(base / layout / "final.pt", weights_only=False)
    b = torch.load(base / f"{layout}_to_{layout}" / "final.pt", weights_only=False)
    assert_identical(flatten(a), flatten(b), f"{layout}: straight vs resumed final state")


def test_every_rank_writes_its_own_shards(base):
    step5 = base / "fsdp" / "checkpoint" / "step-5"
    assert sorted(p.name for p in step5.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    manifest = json.loads((step5 / "manifest.json").read_text())
    assert manifest["layout"] == {"data_parallel_replicate_degree": 1, "data_parallel_shard_degree": 2,
                                  "tensor_parallel_degree": 1, "world_size": 2}
    assert set(manifest["files"]) == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    # TP's column-sharded weights (and their Adam moments) are stored as column tiles: 2 row chunks x 8
    meta = FileSystemReader(str(step5)).read_metadata().state_dict_metadata
    for key in ("layers.0.attention.wo.weight", "optimizer.state.layers.5.feed_forward.w2.weight.exp_avg_sq"):
        assert len(meta[key].chunks) == 16, key
    assert len(meta["layers.0.attention.wq.weight"].chunks) == 2
    assert not list((base / "fsdp" / "checkpoint").glob(".step-*"))


def test_a_failed_rank_fails_the_save_on_every_rank(base):
    result = json.loads((base / "failsave" / "result.json").read_text())
    assert all(e is not None and "saving step 10" in e and "nothing was committed" in e for e in result["errors"])
    assert all("(rank 1: OSError: injected: rank 1 lost its disk)" in e for e in result["errors"])
    assert result["entries"] == ["step-4"]  # step-2 retired by retention; no step-10, no staging leftovers
    assert result["step4_unchanged"]


def test_failures_outside_dcp_fail_every_rank_without_hanging(base):
    result = json.loads((base / "failprep" / "result.json").read_text())
    state, begin = result["state"], result["begin"]
    assert all(e and "saving step 10" in e and "nothing was committed" in e for e in state["errors"])
    assert state["errors"][0] == state["errors"][1]  # both name the rank that failed, and why
    assert "(rank 1: RuntimeError: injected: no optimizer state)" in state["errors"][0]
    assert begin["errors"][0] == begin["errors"][1]
    assert "creating" in begin["errors"][0] and "No space left on device" in begin["errors"][0]
    assert state["entries"] == begin["entries"] == ["step-5"]
    assert result["trained_to"] == 6


@pytest.mark.parametrize("layout", ["fsdp", "tp", "hsdp"])
def test_training_is_layout_independent_within_tolerance(base, layout):
    one, other = losses(base / "one"), losses(base / layout)
    assert sorted(other) == list(range(1, 11))
    assert all(abs(other[s] - one[s]) <= LOSS_TOLERANCE for s in one)


# ------------------------------------------------------------------------------------- dataloader


def test_dataloader_resumes_across_dp_degrees(base):
    """dp=2 -> dp=1: after the resume, the samples read are exactly those of the uninterrupted dp=2 run."""
    uninterrupted = json.loads((base / "fsdp" / "consumed.json").read_text())
    resumed = json.loads((base / "fsdp_to_one" / "consumed.json").read_text())
    assert len(uninterrupted) == 10 and len(resumed) == 5
    assert resumed == uninterrupted[5:]
    everything = [i for step in uninterrupted for i in step]
    assert everything == list(range(40))  # no sample skipped or repeated


@pytest.mark.parametrize("layout", ["tp", "hsdp"])
def test_every_layout_reads_the_same_global_batches(base, layout):
    assert json.loads((base / layout / "consumed.json").read_text()) == \
        json.loads((base / "one" / "consumed.json").read_text())


# ---------------------------------------------------------------------------------- Hugging Face


def test_hf_final_save_at_two_ranks_loads_in_transformers(base):
    transformers = pytest.importorskip("transformers")
    from savepoint.models.llama3 import LLAMA3_FLAVORS, Transformer

    step10 = base / "hf_fsdp" / "checkpoint" / "step-10"
    assert sorted(p.name for p in step10.iterdir()) == [
        "config.json", "manifest.json", "model.safetensors", "model.safetensors.index.json"]
    final = torch.load(base / "hf_fsdp" / "final.pt")
    ours = Transformer(LLAMA3_FLAVORS["debugmodel"].with_max_seq_len(32))
    ours.load_state_dict(final)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(step10), local_files_only=True)
    tokens = torch.randint(0, 2048, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf.eval()(tokens).logits - ours.eval()(tokens)).abs().max().item()
    assert diff < 1e-5, diff


def test_initial_load_in_hf_at_tp(base):
    assert_identical(torch.load(base / "hf_fsdp" / "final.pt"), torch.load(base / "hf_to_tp" / "loaded.pt"),
                     "HF folder loaded at TP(2)")


@pytest.mark.parametrize("layout", ["fsdp", "tp"])
def test_dcp_to_torch_cli_on_a_2_rank_checkpoint(base, layout):
    """``python -m torch.distributed.checkpoint.format_utils dcp_to_torch`` consolidates the shards of 2 ranks."""
    from tests.test_format_utils import check_dcp_to_torch

    final = torch.load(base / layout / "final.pt", weights_only=True)  # gathered from the shards after step 10
    out = check_dcp_to_torch(base / layout / "checkpoint" / "step-10", final["model"])
    assert_identical(flatten(final["optimizer"]), flatten(out["optimizer"]), f"{layout}: optimizer via dcp_to_torch")


@pytest.mark.parametrize("mode", ["async", "async_with_pinned_mem"])
def test_async_saves_at_two_ranks_equal_sync_saves(base, mode):
    """At 2 ranks; async_with_pinned_mem writes from a background process here (torchrun gives it a group)."""
    step5 = base / f"{mode}_fsdp" / "checkpoint" / "step-5"
    assert sorted(p.name for p in step5.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert_identical(saved_tensors(base / "fsdp" / "checkpoint" / "step-5", base), saved_tensors(step5, base),
                     f"{mode} step 5 vs sync step 5")
    assert not list((base / f"{mode}_fsdp" / "checkpoint").glob(".step-*"))
