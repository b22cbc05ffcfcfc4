"""Pipeline parallelism on gloo: every schedule against one process, resume, resharding to and from PP,
``dcp_to_torch`` of a PP step, and the seed workflow of the guide (TorchTitan's docs/checkpoint.md).

One module fixture runs every job once: the seed command through ``./run_train.sh``, 1-process jobs
in this process, the PP 2 x FSDP 2 jobs in one 4-process torchrun launch, the PP(2) jobs in one
2-process launch; the tests then check what they wrote (see tests/pp_worker.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from savepoint.config.layout import checked_pipeline_plan
from savepoint.job import parse_args
from savepoint.train import Trainer
from tests import dist_worker
from tests import pp_worker as worker
from tests.conftest import ROOT, losses, make_config
from tests.test_distributed import assert_identical, flatten, forget_saved_tensors, loaded_state, saved_tensors
from tests.test_distributed import torchrun as distributed_torchrun
from tests.test_format_utils import dcp_to_torch

pytestmark = pytest.mark.distributed

# Saved at one layout, loaded at another: step 5, then trained 2 more steps (to UNTIL).
MATRIX = [("pp_1f1b", "one"), ("pp_1f1b", "fsdp"), ("pp_1f1b", "tp"), ("fsdp", "pp_1f1b"), ("one", "pp_1f1b"),
          ("pp_fsdp", "pp_1f1b"), ("pp_fsdp", "one"), ("one", "pp_fsdp"), ("pp_1f1b", "pp_i1f1b")]
UNTIL = 7
FOUR = ["straight:pp_fsdp", f"resume:one>pp_fsdp@{UNTIL}", "seed:seed>pp_fsdp", "short:pp_tp@3", "short:pp_hsdp@3"]
TWO = ["straight:pp_gpipe", "straight:pp_1f1b", "straight:pp_i1f1b",
       "short:pp_loopedbfs@3", "short:pp_izb@3", "short:pp_zbv@3", "short:pp_dualpipev@3",
       "short:fsdp@5", "resume:pp_1f1b>pp_1f1b",
       *(f"resume:{s}>{d}@{UNTIL}" for s, d in MATRIX if d not in ("one", "pp_fsdp")),
       "seed:seed>pp_1f1b", "seed:seed>pp_i1f1b", "seed:guide_seed>pp_1f1b", "resave:one>pp_1f1b"]
ONE = [f"resume:{s}>one@{UNTIL}" for s, d in MATRIX if d == "one"]
# Sums in another order (microbatches, sharded matmuls) change the last bits of float32 results;
# measured differences from one process are below 1e-6.
TOLERANCE = 1e-5

# The guide's "Creating Seed Checkpoints" command (TorchTitan's docs/checkpoint.md), as written there.
SEED_COMMAND = """NGPU=1 CONFIG_FILE=<path_to_config> ./run_train.sh \\
  --checkpoint.enable \\
  --checkpoint.create_seed_checkpoint \\
  --parallelism.data_parallel_replicate_degree 1 \\
  --parallelism.data_parallel_shard_degree 1 \\
  --parallelism.tensor_parallel_degree 1 \\
  --parallelism.pipeline_parallel_degree 1 \\
  --parallelism.context_parallel_degree 1 \\
  --parallelism.expert_parallel_degree 1"""
# Then a PP run starts from it (2 steps of the debug config keep it short).
PP_COMMAND = "NGPU=2 CONFIG_FILE=<path_to_config> ./run_train.sh --checkpoint.enable " \
             "--parallelism.pipeline_parallel_degree 2 --training.steps 2"


def start_shell(command: str, config: Path) -> subprocess.Popen:
    """Start ``command`` in the repository root, as a user types it, with ``<path_to_config>`` filled in."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SAVEPOINT_PYTHON": sys.executable}
    return subprocess.Popen(["bash", "-c", command.replace("<path_to_config>", str(config))], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_shell(command: str, started: subprocess.Popen) -> subprocess.CompletedProcess:
    """Wait for a ``start_shell`` command; it must exit 0."""
    try:
        stdout, stderr = started.communicate(timeout=600)
    finally:
        if started.poll() is None:
            started.kill()
            started.communicate()
    assert started.returncode == 0, f"{command}\n{stdout[-3000:]}\n{stderr[-3000:]}"
    return subprocess.CompletedProcess(started.args, started.returncode, stdout, stderr)


def guide_config(base: Path) -> Path:
    """The debug config, its dump folder in ``base/guide_seed`` (so the commands stay as the guide writes them)."""
    text = (ROOT / "configs" / "debug_model.toml").read_text()
    assert 'dump_folder = "./outputs"' in text
    path = base / "guide.toml"
    path.write_text(text.replace('dump_folder = "./outputs"', f'dump_folder = "{base / "guide_seed"}"'))
    return path


def torchrun(base: Path, nproc: int, scenarios: list[str]) -> None:
    distributed_torchrun(base, nproc, scenarios, worker="pp_worker.py")


@pytest.fixture(scope="module")
def base(tmp_path_factory, request) -> Iterator[Path]:
    failed_before = request.session.testsfailed
    base = tmp_path_factory.mktemp("pp")
    # The guide's seed command runs next to the 1-process jobs (each takes one core).
    seed_command = start_shell(SEED_COMMAND, guide_config(base))
    try:
        with dist_worker.one_thread():
            dist_worker.make_seed(base)  # another seed (7), so loading it visibly changes the weights
            worker.straight(base, "one")
    finally:
        finish_shell(SEED_COMMAND, seed_command)
    torchrun(base, 4, FOUR)
    torchrun(base, 2, TWO)
    with dist_worker.one_thread():
        for scenario in ONE:
            worker.run_scenario(base, scenario)
    yield base
    forget_saved_tensors()
    # ~3 GB of checkpoints: removed once every test of the module passed (tmp_path_retention_policy
    # "failed" does not cover a module's folder); a failed run's stays for inspection.
    if request.session.testsfailed == failed_before:
        shutil.rmtree(base, ignore_errors=True)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())[:5]
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def consumed(base: Path, run: str) -> list[list[int]]:
    return json.loads((base / run / "consumed.json").read_text())


# ---------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("layout", ["pp_gpipe", "pp_1f1b", "pp_i1f1b", "pp_fsdp"])
def test_pp_training_matches_one_process(base, layout):
    one, pp = losses(base / "one"), losses(base / layout)
    assert sorted(pp) == list(range(1, 11))
    assert all(abs(pp[s] - one[s]) <= TOLERANCE for s in one), [(s, pp[s], one[s]) for s in one]
    final_one = torch.load(base / "one" / "final.pt", weights_only=False)["model"]
    final_pp = torch.load(base / layout / "final.pt", weights_only=False)["model"]
    assert max_diff(final_one, final_pp) <= TOLERANCE
    assert consumed(base, layout) == consumed(base, "one")  # the same global batches, step by step
    # The logged gradient norm covers every stage's gradients (one stage's alone would be ~0.7x). FSDP's
    # reduce-scatter sums the gradients in another order: 7e-5 relative at PP(2) x FSDP(2), as at FSDP(2).
    norms_one, norms_pp = grad_norms(base / "one"), grad_norms(base / layout)
    assert all(abs(norms_pp[s] - norms_one[s]) <= 1e-3 * norms_one[s] for s in norms_one), (norms_one, norms_pp)


def grad_norms(dump_folder: Path) -> dict[int, float]:
    lines = (dump_folder / "metrics.jsonl").read_text().splitlines()
    return {rec["step"]: rec["grad_norm"] for rec in map(json.loads, lines)}


@pytest.mark.parametrize("layout", ["pp_loopedbfs", "pp_izb", "pp_zbv", "pp_dualpipev", "pp_tp", "pp_hsdp"])
def test_other_schedules_and_compositions_match_one_process(base, layout):
    """The other schedules at PP(2); PP(2) x TP(2) and PP(2) x HSDP(2x1) at 4 processes (3 steps each)."""
    one, pp = losses(base / "one"), losses(base / layout)
    assert sorted(pp) == [1, 2, 3]
    assert all(abs(pp[s] - one[s]) <= TOLERANCE for s in pp), [(s, pp[s], one[s]) for s in pp]


@pytest.mark.parametrize("layout", ["pp_gpipe", "pp_1f1b", "pp_i1f1b", "pp_fsdp", "pp_tp", "pp_hsdp"])
def test_init_without_seed_checkpoint_equals_one_process(base, layout):
    assert_identical(torch.load(base / "one" / "init.pt"), torch.load(base / layout / "init.pt"),
                     f"init at {layout} vs 1 process")


def test_pp_step_has_the_one_process_keys_and_a_file_per_rank(base):
    step5 = base / "pp_1f1b" / "checkpoint" / "step-5"
    assert sorted(p.name for p in step5.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    manifest = json.loads((step5 / "manifest.json").read_text())
    assert manifest["layout"]["pipeline_parallel_degree"] == 2 and manifest["layout"]["world_size"] == 2
    pp_keys = FileSystemReader(str(step5)).read_metadata().state_dict_metadata.keys()
    one_keys = FileSystemReader(str(base / "one" / "checkpoint" / "step-5")).read_metadata().state_dict_metadata
    assert pp_keys == one_keys.keys()
    # Each stage writes only what it holds, nothing twice: every tensor's bytes are in one file,
    # the first stage's in rank 0's, the last stage's in rank 1's, and as many bytes as at 1 process.
    tensors = [k for k, v in one_keys.items() if isinstance(v, TensorStorageMetadata)]
    pp_storage = FileSystemReader(str(step5)).read_metadata().storage_data
    one_storage = FileSystemReader(str(base / "one" / "checkpoint" / "step-5")).read_metadata().storage_data
    files: dict[str, set[str]] = {}
    for index, info in pp_storage.items():
        files.setdefault(index.fqn, set()).add(info.relative_path)
    assert all(len(files[k]) == 1 for k in tensors), {k: files[k] for k in tensors if len(files[k]) != 1}
    assert files["tok_embeddings.weight"] == files["layers.2.attention.wq.weight"] == {"__0_0.distcp"}
    assert files["layers.3.attention.wq.weight"] == files["output.weight"] == {"__1_0.distcp"}
    assert files["optimizer.state.output.weight.exp_avg"] == {"__1_0.distcp"}

    def tensor_bytes(storage) -> int:
        return sum(info.length for index, info in storage.items() if index.fqn in tensors)

    assert tensor_bytes(pp_storage) == tensor_bytes(one_storage)


# ------------------------------------------------------------------------------ resume, reshard


def test_same_layout_resume_is_bit_exact(base):
    straight, resumed = losses(base / "pp_1f1b"), losses(base / "pp_1f1b_to_pp_1f1b")
    assert [resumed[s] for s in range(6, 11)] == [straight[s] for s in range(6, 11)]
    a = torch.load(base / "pp_1f1b" / "final.pt", weights_only=False)
    b = torch.load(base / "pp_1f1b_to_pp_1f1b" / "final.pt", weights_only=False)
    assert_identical(flatten(a), flatten(b), "PP(2): straight vs resumed final state")
    assert any(k.endswith("exp_avg_sq") for k in flatten(b))


@pytest.mark.parametrize("source,layout", [*MATRIX, ("pp_1f1b", "pp_1f1b")])
def test_reshard_load_is_bit_identical(base, source, layout):
    saved = saved_tensors(base / source / "checkpoint" / "step-5", base)
    saved = {k: v for k, v in saved.items() if not k.startswith(("train_state", "lr_scheduler", "dataloader"))}
    got = loaded_state(base, f"{source}_to_{layout}")
    assert_identical(saved, got, f"{source} step 5 loaded at {layout}")
    assert any(k.startswith("optimizer.state.") and k.endswith("exp_avg_sq") for k in got)


def test_interleaved_runs_two_stages_per_rank_of_another_split(tmp_path):
    """What resharding 1F1B -> Interleaved1F1B changes: 2 stages (one per rank) become 4 (two per rank)."""
    single, looped = (checked_pipeline_plan(make_config(tmp_path, *worker.LAYOUTS[layout]), 2, 6)
                      for layout in ("pp_1f1b", "pp_i1f1b"))
    assert single.modules_per_stage[0] == ("tok_embeddings", "layers.0", "layers.1", "layers.2")
    assert [single.stages_of(r) for r in (0, 1)] == [(0,), (1,)]
    assert looped.num_stages == 4 and [looped.stages_of(r) for r in (0, 1)] == [(0, 2), (1, 3)]
    assert looped.modules_per_stage[2] == ("layers.3", "layers.4")


@pytest.mark.parametrize("source,layout", MATRIX)
def test_training_and_data_continue_after_reshard(base, source, layout):
    run = f"{source}_to_{layout}"
    where = json.loads((base / run / "loaded.json").read_text())
    assert where["step"] == 5 and set(where["sample_index"]) == {20}  # 5 steps of 4 samples, on every rank
    # the next samples, none skipped or repeated
    assert consumed(base, run) == consumed(base, "one")[5:UNTIL] == [list(range(20, 24)), list(range(24, 28))]
    one, resumed = losses(base / "one"), losses(base / run)
    assert sorted(resumed) == list(range(6, UNTIL + 1))
    assert all(abs(resumed[s] - one[s]) <= TOLERANCE for s in resumed), [(s, resumed[s], one[s]) for s in resumed]


def test_dcp_to_torch_of_a_pp_step_equals_the_one_process_step(base):
    """The 1-process step 5, loaded at PP(2) and saved again at once, converts to the same file."""
    resaved = base / "resave_one_to_pp_1f1b" / "checkpoint" / "step-5"
    assert sorted(p.name for p in resaved.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    pp = dcp_to_torch(resaved, base / "resaved.pt")  # torch's CLI, as a user runs it
    dcp_to_torch_save(base / "one" / "checkpoint" / "step-5", base / "one5.pt")
    one = torch.load(base / "one5.pt", weights_only=True)
    assert_identical(flatten(one), flatten(pp), "dcp_to_torch of PP(2) vs 1-process step 5")
    plain = {k: v for k, v in flatten_all(one).items() if not isinstance(v, torch.Tensor)}
    assert plain and plain == {k: v for k, v in flatten_all(pp).items() if not isinstance(v, torch.Tensor)}


def flatten_all(tree, prefix: str = "") -> dict:
    """Every leaf of a nested dict (tensors and plain values), under dotted keys."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten_all(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# ----------------------------------------------------------------------------------------- seed


@pytest.mark.parametrize("seed,layout", [("seed", "pp_1f1b"), ("seed", "pp_i1f1b"), ("seed", "pp_fsdp"),
                                         ("guide_seed", "pp_1f1b")])
def test_seed_checkpoint_loads_bit_identical_at_pp(base, seed, layout):
    saved = saved_tensors(base / seed / "checkpoint" / "step-0", base)
    got = torch.load(base / f"{seed}_to_{layout}" / "loaded.pt")
    assert_identical(saved, got, f"{seed} loaded at {layout}")
    if seed == "seed":  # made with --training.seed 7, these runs use 0: the load really happened
        assert not torch.equal(torch.load(base / "one" / "init.pt")["output.weight"], got["output.weight"])


def test_seed_workflow_of_the_guide(base):
    """The guide's seed command, then a PP(2) run of ./run_train.sh that starts from it: its losses
    equal those of one process started from the same seed (step 1's loss is the seed weights')."""
    config = base / "guide.toml"
    dump = base / "guide_seed"
    assert sorted(p.name for p in (dump / "checkpoint").iterdir()) == ["step-0"]
    reference = base / "guide_one"
    shutil.copytree(dump / "checkpoint" / "step-0", reference / "checkpoint" / "step-0")
    pp_command = start_shell(PP_COMMAND, config)
    try:  # the 1-process reference trains meanwhile, from its own copy of the seed
        trainer = Trainer(parse_args(["--job.config_file", str(config), "--job.dump_folder", str(reference),
                                      "--checkpoint.enable", "--training.steps", "2"], environ={}))
        try:
            with dist_worker.one_thread():
                trainer.train()
        finally:
            trainer.checkpointer.close()
    finally:
        proc = finish_shell(PP_COMMAND, pp_command)
    assert "step-0 is a seed checkpoint" in proc.stdout and "PP 2" in proc.stdout
    step2 = dump / "checkpoint" / "step-2"
    assert sorted(p.name for p in step2.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert trainer.loaded_step == 0
    pp, one = losses(dump), losses(reference)
    assert sorted(pp) == sorted(one) == [1, 2]
    assert all(abs(pp[s] - one[s]) <= TOLERANCE for s in one), (pp, one)
