"""TorchTitan v0.2.2 checkpoints resume here, and savepoint's checkpoints hold every entry TorchTitan loads.

The fixture ``tests/assets/torchtitan_keys/step-3`` was written by TorchTitan 0.2.2's own
``CheckpointManager`` (``generate.py`` beside it): 3 steps of a tiny Llama 3 with TorchTitan's AdamW
container, its warmup-stable-decay ``LRSchedulersContainer``, its ``ParallelAwareDataloader`` and a
train state of ``step`` and ``ntokens_seen``, as ``torchtitan/train.py`` saves it. ``expected.json``
holds the lr TorchTitan trained each step at, also past the save.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from savepoint.checkpoint.manager import CheckpointManager
from savepoint.checkpoint.states import (
    DATALOADER,
    LR_SCHEDULER,
    OPTIMIZER,
    TITAN_LR_SCHEDULER_KEYS,
    TRAIN_STATE,
    LRSchedulerState,
    OptimizerState,
    TrainState,
)
from savepoint.config.job_config import Checkpoint, LRScheduler, Optimizer
from savepoint.data.dataset import build_dataloader
from savepoint.models.llama3 import ModelArgs, build_model
from savepoint.optim import build_lr_scheduler, build_optimizer, resume_schedule

FIXTURE = Path(__file__).parent / "assets" / "torchtitan_keys"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())


def titan_saved(step: Path) -> dict:
    """Every entry of a checkpoint as plain DCP reads it (no savepoint code involved)."""
    flat = step.parent / f".{step.name}.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(str(step), str(flat))
    state = torch.load(flat, weights_only=False)
    flat.unlink()
    return state


def components(seed: int, sched_steps: int = EXPECTED["training"]["steps"]):
    """savepoint's model and components for the fixture's model and settings."""
    model = build_model(ModelArgs(**EXPECTED["model_args"]), seed=seed)
    optimizer = build_optimizer(model, Optimizer(lr=EXPECTED["optimizer"]["lr"]))
    scheduler = build_lr_scheduler(optimizer, LRScheduler(**EXPECTED["lr_scheduler"]), sched_steps)
    loader = build_dataloader("pydocs", EXPECTED["training"]["seq_len"], EXPECTED["training"]["local_batch_size"],
                              seed=0)
    train_state = TrainState()
    states = {OPTIMIZER: OptimizerState(model, optimizer), LR_SCHEDULER: LRSchedulerState(scheduler),
              DATALOADER: loader, TRAIN_STATE: train_state}
    return model, optimizer, scheduler, loader, train_state, states


def manager(dump: Path, model, states, **cfg) -> CheckpointManager:
    return CheckpointManager(Checkpoint(enable=True, folder="checkpoint", **cfg), str(dump), model, states, {})


def titan_dump(tmp_path: Path) -> Path:
    dump = tmp_path / "titan"
    shutil.copytree(FIXTURE / "step-3", dump / "checkpoint" / "step-3")
    return dump


def test_torchtitan_checkpoint_resumes_exactly(tmp_path, caplog):
    dump = titan_dump(tmp_path)
    saved = titan_saved(dump / "checkpoint" / "step-3")
    model, optimizer, scheduler, loader, train_state, states = components(seed=1)
    ckpt = manager(dump, model, states, load_only=True)
    with caplog.at_level(logging.WARNING, logger="savepoint.checkpoint.loading"):
        assert ckpt.load() == 3
    ckpt.close()
    resume_schedule(scheduler, [EXPECTED["optimizer"]["lr"]])

    assert (train_state.step, train_state.ntokens_seen) == (3, EXPECTED["ntokens_seen"])
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[key]), key
    restored = states[OPTIMIZER].state_dict()
    for key, value in saved[OPTIMIZER].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(restored[key], value), key
        else:
            assert restored[key] == value, key
    assert {k: scheduler.state_dict()[k] for k in TITAN_LR_SCHEDULER_KEYS} == \
        {k: saved[LR_SCHEDULER][k] for k in TITAN_LR_SCHEDULER_KEYS}
    # the lr of every following step is the one TorchTitan trained it at
    for step in (4, 5, 6):
        assert optimizer.param_groups[0]["lr"] == EXPECTED["lr_per_step"][str(step)], step
        scheduler.step()
    # TorchTitan's data-loader state is skipped, with a warning that says so
    assert loader.sample_index == 0
    warned = [r.getMessage() for r in caplog.records if "data-loader state" in r.getMessage()]
    assert len(warned) == 1 and "dataloader.dp_rank_0" in warned[0] and "starts again from its first sample" in \
        warned[0] and "--checkpoint.exclude_from_loading dataloader" in warned[0]


def test_the_schedule_is_torchtitans_from_the_first_step():
    _, optimizer, scheduler, _, _, _ = components(seed=0)
    for step in range(1, 7):
        assert optimizer.param_groups[0]["lr"] == EXPECTED["lr_per_step"][str(step)], step
        scheduler.step()


def test_excluding_the_dataloader_loads_without_the_warning(tmp_path, caplog):
    dump = titan_dump(tmp_path)
    model, _, scheduler, _, train_state, states = components(seed=1)
    ckpt = manager(dump, model, states, load_only=True, exclude_from_loading=["dataloader"])
    with caplog.at_level(logging.WARNING, logger="savepoint.checkpoint.loading"):
        assert ckpt.load() == 3
    ckpt.close()
    assert train_state.step == 3 and scheduler.last_epoch == 3
    assert not [r for r in caplog.records if "data-loader state" in r.getMessage()]


def titan_request(template: Path) -> dict:
    """What TorchTitan 0.2.2 asks DCP for when it resumes with exclude_from_loading = ["dataloader"]:
    each entry of its own checkpoint (``template``) but the data loader's, nested by component as its
    ``CheckpointManager._states_to_load`` hands it over (model flat, the rest under their names)."""
    reference = titan_saved(template)
    request: dict = {}
    for key, value in reference.items():
        if key == DATALOADER:
            continue
        if isinstance(value, dict):
            request[key] = {k: torch.empty_like(v) if isinstance(v, torch.Tensor) else v for k, v in value.items()}
        else:
            request[key] = torch.empty_like(value)
    return request


def test_torchtitan_finds_every_entry_it_loads_in_a_savepoint_checkpoint(tmp_path):
    model, optimizer, scheduler, _, train_state, states = components(seed=2)
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    optimizer.step()
    scheduler.step()
    train_state.step, train_state.ntokens_seen = 1, 16
    ckpt = manager(tmp_path / "ours", model, states, last_save_model_only=False)
    ckpt.save(1, last_step=True)
    ckpt.close()
    step = tmp_path / "ours" / "checkpoint" / "step-1"

    ours = FileSystemReader(str(step)).read_metadata().state_dict_metadata
    titan = FileSystemReader(str(FIXTURE / "step-3")).read_metadata().state_dict_metadata
    wanted = {k for k in titan if not k.startswith(DATALOADER + ".")}
    assert wanted <= set(ours), sorted(wanted - set(ours))

    request = titan_request(FIXTURE / "step-3")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(request, checkpoint_id=str(step), no_dist=True)  # raises on any missing entry
    for key, tensor in model.state_dict().items():
        assert torch.equal(request[key], tensor), key
    assert request[LR_SCHEDULER]["last_epoch"] == 1 and request[LR_SCHEDULER]["_last_lr"] == scheduler.get_last_lr()
    assert request[TRAIN_STATE] == {"step": 1, "ntokens_seen": 16}
    exp_avg = next(k for k in request[OPTIMIZER] if k.endswith(".exp_avg"))
    assert torch.equal(request[OPTIMIZER][exp_avg], states[OPTIMIZER].state_dict()[exp_avg])


def test_older_savepoint_scheduler_entries_still_load():
    """Steps written before the scheduler followed TorchTitan's names also hold ``lr_lambdas: [None]``."""
    _, _, scheduler, _, _, states = components(seed=0)
    older = {**scheduler.state_dict(), "last_epoch": 4, "_step_count": 5}
    assert older["lr_lambdas"] == [None] and "lr_lambdas" not in states[LR_SCHEDULER].state_dict()
    states[LR_SCHEDULER].load_state_dict(older)
    assert scheduler.last_epoch == 4 and scheduler.lr_lambdas[0].__name__ == "factor"


@pytest.mark.parametrize("missing", ["lr_lambdas"])
def test_torchtitan_scheduler_entries_load_without(missing):
    _, _, scheduler, _, _, states = components(seed=0)
    titan = {k: v for k, v in scheduler.state_dict().items() if k != missing}
    states[LR_SCHEDULER].load_state_dict({**titan, "last_epoch": 7})
    assert scheduler.last_epoch == 7


def test_resume_with_more_steps_trains_the_next_step_at_this_runs_schedule(tmp_path):
    """A 20-step run (its schedule ends at lr 0) resumed with 22 steps: step 21 trains at the 22-step lr."""
    model, optimizer, scheduler, _, train_state, states = components(seed=0, sched_steps=20)
    for _ in range(20):
        optimizer.step()
        scheduler.step()
    train_state.step = 20
    assert optimizer.param_groups[0]["lr"] == 0.0  # what the step-20 checkpoint holds
    ckpt = manager(tmp_path, model, states, last_save_model_only=False)
    ckpt.save(20, last_step=True)
    ckpt.close()

    model, optimizer, scheduler, _, train_state, states = components(seed=0, sched_steps=22)
    fresh = [optimizer.param_groups[0]["lr"]]
    for _ in range(21):
        optimizer.step()
        scheduler.step()
        fresh.append(optimizer.param_groups[0]["lr"])  # fresh[n]: the lr step n + 1 trains at
    model, optimizer, scheduler, _, train_state, states = components(seed=0, sched_steps=22)
    ckpt = manager(tmp_path, model, states, load_only=True)
    assert ckpt.load() == 20
    ckpt.close()
    resume_schedule(scheduler, [EXPECTED["optimizer"]["lr"]])
    assert optimizer.param_groups[0]["lr"] == fresh[20] > 0  # step 21
    assert scheduler.get_last_lr() == [fresh[20]]
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == fresh[21]  # step 22
