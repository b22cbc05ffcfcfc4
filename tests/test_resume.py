"""Resume, partial loads and final saves, through the real trainer and torch DCP."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from savepoint.checkpoint.storage import CheckpointFolder
from savepoint.errors import CheckpointError, NotSupportedYet
from tests.conftest import losses


def optimizer_tensors(trainer) -> dict[str, torch.Tensor]:
    out = {}
    names = {p: n for n, p in trainer.model.named_parameters()}
    for param, state in trainer.optimizer.state.items():
        for key, value in state.items():
            out[f"{names[param]}.{key}"] = value
    return out


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), f"{key} differs"


def test_resume_is_bit_exact(train, tmp_path):
    straight = train(dump=tmp_path / "straight")
    train(dump=tmp_path / "resumed", stop_after=10)
    assert CheckpointFolder(tmp_path / "resumed/checkpoint").committed_steps() == [5, 10]
    resumed = train(dump=tmp_path / "resumed")

    expected, got = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert [got[s] for s in range(11, 21)] == [expected[s] for s in range(11, 21)]
    assert_bit_identical(straight.model.state_dict(), resumed.model.state_dict())
    assert_bit_identical(optimizer_tensors(straight), optimizer_tensors(resumed))
    assert resumed.lr_scheduler.state_dict() == straight.lr_scheduler.state_dict()
    assert resumed.dataloader.sample_index == straight.dataloader.sample_index
    assert resumed.train_state.ntokens_seen == straight.train_state.ntokens_seen


def test_rng_state_is_restored(train, tmp_path):
    train(stop_after=5)
    saved = FileSystemReader(str(tmp_path / "run/checkpoint/step-5")).read_metadata()
    assert "train_state.rng_state.cpu" in saved.state_dict_metadata
    torch.manual_seed(1234)  # disturb the global RNG; the resume must put it back
    after_resume = train(stop_after=5)
    assert after_resume.train_state.step == 5
    state = {"train_state": {"rng_state": {"cpu": torch.empty_like(torch.get_rng_state())}}}
    dcp.load(state, checkpoint_id=str(tmp_path / "run/checkpoint/step-5"))
    assert torch.equal(torch.get_rng_state(), state["train_state"]["rng_state"]["cpu"])


def test_exclude_dataloader_and_lr_scheduler(train, tmp_path):
    first = train(stop_after=10)
    trainer = train("--checkpoint.exclude_from_loading", "data_loader,lr_scheduler", stop_after=10)
    # Nothing new trained (stop_after=10), so the live state is exactly what the load restored.
    assert trainer.train_state.step == 10
    assert trainer.dataloader.sample_index == 0  # data restarts from the first sample
    assert trainer.lr_scheduler.last_epoch == 0  # the schedule restarts its warmup
    assert first.dataloader.sample_index == 10 * 2 and first.lr_scheduler.last_epoch == 10
    assert_bit_identical(trainer.model.state_dict(), first.model.state_dict())
    assert_bit_identical(optimizer_tensors(trainer), optimizer_tensors(first))


def test_exclude_changes_the_continuation(train, tmp_path):
    train(dump=tmp_path / "a", stop_after=10)
    train(dump=tmp_path / "a", stop_after=11)
    train(dump=tmp_path / "b", stop_after=10)
    train("--checkpoint.exclude_from_loading", "dataloader,lr_scheduler", dump=tmp_path / "b", stop_after=11)
    assert losses(tmp_path / "a")[11] != losses(tmp_path / "b")[11]
    assert losses(tmp_path / "a")[10] == losses(tmp_path / "b")[10]


def test_load_step_and_missing_step(train, tmp_path):
    train(stop_after=10)
    trainer = train("--checkpoint.load_step", "5", stop_after=5)
    assert trainer.train_state.step == 5
    with pytest.raises(CheckpointError) as err:
        train("--checkpoint.load_step", "7")
    message = str(err.value)
    assert "--checkpoint.load_step=7" in message and "[5, 10]" in message


def test_load_step_loads_that_steps_weights(train, tmp_path):
    train(stop_after=5)
    five = train(stop_after=5)  # resumes at 5 and trains nothing
    train(stop_after=10)
    again = train("--checkpoint.load_step", "5", stop_after=5)
    assert_bit_identical(again.model.state_dict(), five.model.state_dict())


def test_final_model_only_bf16_save(train, tmp_path):
    trainer = train("--training.steps", "4", "--checkpoint.last_save_model_only",
                    "--checkpoint.export_dtype", "bfloat16")
    step_dir = tmp_path / "run/checkpoint/step-4"
    meta = FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata
    model_keys = set(trainer.model.state_dict())
    assert set(meta) == model_keys  # nothing but the model, and no freqs_cis buffer
    assert all(m.properties.dtype == torch.bfloat16 for m in meta.values())
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # the live model is untouched
    loaded = {k: torch.empty(v.shape, dtype=torch.bfloat16) for k, v in trainer.model.state_dict().items()}
    dcp.load(loaded, checkpoint_id=str(step_dir))
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(loaded[key], value.to(torch.bfloat16)), key


def test_resuming_from_model_only_final_save_is_a_clear_error(train, tmp_path):
    train("--training.steps", "6", "--checkpoint.last_save_model_only")
    with pytest.raises(CheckpointError) as err:
        train("--training.steps", "12")
    message = str(err.value)
    assert "model-only" in message and "--checkpoint.load_step 5" in message


def test_keep_latest_k(train, tmp_path):
    train("--checkpoint.interval", "1", "--checkpoint.keep_latest_k", "3", stop_after=7)
    assert CheckpointFolder(tmp_path / "run/checkpoint").committed_steps() == [5, 6, 7]
    train("--checkpoint.interval", "1", "--checkpoint.keep_latest_k", "1", stop_after=9)
    assert CheckpointFolder(tmp_path / "run/checkpoint").committed_steps() == [9]
    assert sorted(p.name for p in (tmp_path / "run/checkpoint").iterdir()) == ["step-9"]


def test_keep_all_with_zero(train, tmp_path):
    train("--checkpoint.interval", "2", "--checkpoint.keep_latest_k", "0", stop_after=12)
    assert CheckpointFolder(tmp_path / "run/checkpoint").committed_steps() == [2, 4, 6, 8, 10, 12]


def test_first_step_checkpoint_and_load_only(train, tmp_path):
    train("--checkpoint.enable_first_step_checkpoint", stop_after=3)
    assert CheckpointFolder(tmp_path / "run/checkpoint").committed_steps() == [1]
    trainer = train("--checkpoint.load_only", stop_after=6)
    assert trainer.train_state.step == 6  # loaded step 1, trained on, saved nothing
    assert CheckpointFolder(tmp_path / "run/checkpoint").committed_steps() == [1]


def test_step_zero_loads_model_only(train, tmp_path):
    source = train("--training.steps", "3", "--checkpoint.last_save_model_only", dump=tmp_path / "src")
    folder = tmp_path / "run/checkpoint"
    folder.mkdir(parents=True)
    (tmp_path / "src/checkpoint/step-3").rename(folder / "step-0")
    trainer = train(stop_after=0)
    assert trainer.train_state.step == 0 and trainer.dataloader.sample_index == 0
    assert_bit_identical(trainer.model.state_dict(), source.model.state_dict())
    assert not trainer.optimizer.state  # optimizer untouched: starts fresh


def test_initial_load_path_used_and_skipped(train, tmp_path, caplog):
    source = train(dump=tmp_path / "src", stop_after=5)
    init = ["--checkpoint.initial_load_path", str(tmp_path / "src/checkpoint/step-5")]
    trainer = train(*init, stop_after=0)
    assert trainer.train_state.step == 0  # model only: a fresh run from those weights
    assert_bit_identical(trainer.model.state_dict(), source.model.state_dict())
    full = train(*init, "--checkpoint.no_initial_load_model_only", dump=tmp_path / "full", stop_after=5)
    assert full.train_state.step == 5 and full.dataloader.sample_index == 10
    train(stop_after=5)  # now the job's own folder holds step-5
    with caplog.at_level(logging.INFO, logger="savepoint"):
        resumed = train(*init, stop_after=5)
    assert resumed.train_state.step == 5
    assert "skipping --checkpoint.initial_load_path" in caplog.text


def test_unsupported_options_fail_loudly(tmp_path):
    from savepoint.train import Trainer
    from tests.conftest import make_config

    for flag in (["--parallelism.context_parallel_degree", "2"],
                 ["--parallelism.expert_parallel_degree", "2"]):
        with pytest.raises(NotSupportedYet, match="not supported yet"):
            Trainer(make_config(tmp_path, *flag))


def test_wrong_flavor_names_the_tensor(train, tmp_path):
    train(stop_after=5)
    cfg_dir = tmp_path / "run"
    from dataclasses import replace

    from savepoint.models.llama3 import args as llama_args

    original = llama_args.LLAMA3_FLAVORS["debugmodel"]
    llama_args.LLAMA3_FLAVORS["debugmodel"] = replace(original, dim=128)
    try:
        with pytest.raises(CheckpointError, match=r"tok_embeddings.weight.*shape"):
            train(dump=cfg_dir)
    finally:
        llama_args.LLAMA3_FLAVORS["debugmodel"] = original


def test_only_saved_rng_states_are_requested():
    from savepoint.checkpoint.loading import SavedRNGOnly as _SavedRNGOnly
    from savepoint.checkpoint.states import TrainState

    class GpuTrainState(TrainState):
        def state_dict(self):
            state = super().state_dict()
            state["rng_state"]["cuda"] = torch.zeros(16, dtype=torch.uint8)
            return state

    cpu_only = _SavedRNGOnly(GpuTrainState(), {"train_state.step": 0, "train_state.rng_state.cpu": 0})
    assert set(cpu_only.state_dict()["rng_state"]) == {"cpu"}
    titan = _SavedRNGOnly(GpuTrainState(), {"train_state.step": 0})
    assert "rng_state" not in titan.state_dict()


def test_seed_checkpoint_refuses_a_folder_with_steps(train, tmp_path):
    from savepoint.train import Trainer
    from tests.conftest import make_config

    train(stop_after=5)
    before = sorted(p.name for p in (tmp_path / "run/checkpoint").iterdir())
    trainer = Trainer(make_config(tmp_path / "run", "--checkpoint.create_seed_checkpoint"))
    with pytest.raises(CheckpointError, match=r"already holds steps \[5\].*empty folder"):
        trainer.create_seed_checkpoint()
    trainer.checkpointer.close()  # releases the folder lock (and removes its file)
    assert sorted(p.name for p in (tmp_path / "run/checkpoint").iterdir()) == before


def logged_lrs(dump_folder) -> dict[int, float]:
    """step -> lr from the job's metrics.jsonl (later runs overwrite earlier entries)."""
    import json

    lines = (dump_folder / "metrics.jsonl").read_text().splitlines()
    return {rec["step"]: rec["lr"] for rec in map(json.loads, lines)}


def test_resume_with_more_steps_uses_the_new_schedule_at_once(train, tmp_path):
    """Step 21 of a 20-step run resumed with --training.steps 22 trains at the 22-step schedule's lr, not 0."""
    train(dump=tmp_path / "resumed")  # 20 steps: the schedule decays to 0 at step 20
    train("--training.steps", "22", dump=tmp_path / "resumed")
    train("--training.steps", "22", dump=tmp_path / "fresh", stop_after=21)
    resumed, fresh = logged_lrs(tmp_path / "resumed"), logged_lrs(tmp_path / "fresh")
    assert fresh[21] > 0
    assert resumed[21] == fresh[21]


def test_lr_follows_the_schedule_after_excluding_the_scheduler(train, tmp_path):
    """The optimizer's restored lr (step 10's) is replaced by the restarted schedule's first value."""
    train(dump=tmp_path / "a", stop_after=10)
    trainer = train("--checkpoint.exclude_from_loading", "lr_scheduler", dump=tmp_path / "a", stop_after=11)
    fresh = train(dump=tmp_path / "b", stop_after=1)
    assert logged_lrs(tmp_path / "a")[11] == logged_lrs(tmp_path / "b")[1]
    assert trainer.lr_scheduler.last_epoch == 1 and fresh.lr_scheduler.last_epoch == 1
