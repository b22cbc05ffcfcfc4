"""Values a checkpoint restores are checked for type and range before anything uses them.

The damaged steps here have no manifest (as TorchTitan writes them), so checksums cannot catch
anything: a real step is read back with ``dcp_to_torch_save``, one value is changed, and the
result is written with ``dcp.save`` into a checkpoint folder of its own. Loading it must end in
one ``error:`` line naming the key and the file, exit 1, with no byte of it changed and (for a
library load) the trainer left as it was.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from savepoint.checkpoint.states import LoadedValueError, LRSchedulerState, OptimizerState, StagedLoad, TrainState
from savepoint.data.dataset import build_dataloader
from savepoint.errors import CorruptCheckpointError
from tests.conftest import FAST_ARGS, ROOT, make_config, run_cli
from tests.test_bad_input import snapshot

CONFIG = ROOT / "configs" / "debug_model.toml"
Mutate = Callable[[dict[str, Any]], None]


def craft_step(source_step: Path, dest_step: Path, mutate: Mutate) -> Path:
    """``source_step`` rewritten by DCP into ``dest_step`` after ``mutate(state)``: no manifest, no checksums."""
    flat = dest_step.parent / f".{dest_step.name}.pt"
    dest_step.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP's one-process notice
        dcp_to_torch_save(str(source_step), str(flat))
        state = torch.load(flat, weights_only=False)
        flat.unlink()
        mutate(state)
        dcp.save(state, checkpoint_id=str(dest_step))
    return dest_step


def set_value(path: str, value: Any) -> Mutate:
    """A mutation that sets ``state[a][b]...`` for the dotted ``path`` (the last part may be an int index)."""
    *parents, last = path.split(".")

    def mutate(state: dict[str, Any]) -> None:
        for part in parents:
            state = state[part]
        state[last] = value

    return mutate


def set_param_groups(name: str, value: Any) -> Mutate:
    """Set ``optimizer.param_groups.<fqn>.<name>`` for every parameter."""
    def mutate(state: dict[str, Any]) -> None:
        for key in state["optimizer"]:
            if key.startswith("param_groups.") and key.endswith("." + name):
                state["optimizer"][key] = value

    return mutate


@pytest.fixture(scope="module")
def base_step(tmp_path_factory) -> Path:
    """step-10 of a 10-step debug-model run (full, with its manifest)."""
    from savepoint.train import Trainer

    dump = tmp_path_factory.mktemp("loaded_values") / "base"
    trainer = Trainer(make_config(dump, "--training.steps", "10"))
    trainer.train()
    trainer.checkpointer.close()
    return dump / "checkpoint/step-10"


# name -> (mutation, substrings of the error line after the step's file). More values are checked
# below without a checkpoint; these are the ones that hung or raised a traceback before.
CASES: dict[str, tuple[Mutate, list[str]]] = {
    "negative step": (set_value("train_state.step", -1_000_000_000), ["train_state.step is -1000000000", ">= 0"]),
    "huge sample index": (set_value("dataloader.sample_index", 10**30),
                          ["dataloader.sample_index is 1000000000000000000000000000000", "below 2**63"]),
    "string last_epoch": (set_value("lr_scheduler.last_epoch", "ten"), ["lr_scheduler.last_epoch is 'ten' (str)"]),
    "string lr": (set_param_groups("lr", "fast"), ["optimizer.param_groups.", ".lr is 'fast' (str)", ">= 0"]),
    "invalid RNG state": (set_value("train_state.rng_state.cpu", torch.zeros(5056, dtype=torch.uint8)),
                          ["train_state.rng_state.cpu is a torch.uint8 tensor of shape [5056]",
                           "Invalid mt19937 state"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_loaded_value_is_one_error_line(name, base_step, tmp_path, capsys, monkeypatch):
    mutate, expect = CASES[name]
    monkeypatch.delenv("SAVEPOINT_DEBUG", raising=False)
    dump = tmp_path / "run"
    step = craft_step(base_step, dump / "checkpoint/step-10", mutate)
    before = snapshot(dump / "checkpoint")
    argv = ["train", "--job.config_file", str(CONFIG), "--job.dump_folder", str(dump), *FAST_ARGS,
            "--training.steps", "12"]
    code, out, err = run_cli(argv, capsys)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert code == 1
    line = lines[0]
    assert line.startswith("error: ") and f"{step}/__0_0.distcp: " in line, line
    for want in expect:
        assert want in line, f"{want!r} not in {line!r}"
    assert "nothing was restored" in line
    assert snapshot(dump / "checkpoint") == before
    assert "saved step" not in out  # nothing trained, nothing saved


def test_refused_load_leaves_the_trainer_untouched(base_step, tmp_path):
    """train_state is restored last: without staging, the optimizer, schedule and data would already have changed.

    (DCP reads tensors in place, weights and optimizer moments included, as in every load; what is
    checked here is that no component's own restore ran.)
    """
    from savepoint.train import Trainer

    dump = tmp_path / "run"
    craft_step(base_step, dump / "checkpoint/step-10", set_value("train_state.step", -1))
    trainer = Trainer(make_config(dump))
    rng = torch.get_rng_state()
    lrs = [g["lr"] for g in trainer.optimizer.param_groups]
    with pytest.raises(CorruptCheckpointError, match="train_state.step is -1"):
        trainer.load_checkpoint()
    trainer.checkpointer.close()
    assert trainer.train_state.step == 0 and trainer.train_state.ntokens_seen == 0
    assert trainer.dataloader.sample_index == 0
    assert trainer.lr_scheduler.last_epoch == 0
    assert [g["lr"] for g in trainer.optimizer.param_groups] == lrs  # param groups not restored
    assert torch.equal(torch.get_rng_state(), rng)


def test_corrupt_value_falls_back_to_the_step_before(base_step, tmp_path, capsys, monkeypatch):
    """Two steps without manifests: the newest has a bad value, so auto-resume takes the older one."""
    monkeypatch.delenv("SAVEPOINT_DEBUG", raising=False)
    dump = tmp_path / "run"
    craft_step(base_step, dump / "checkpoint/step-10", lambda state: None)
    (dump / "checkpoint/step-10").rename(dump / "checkpoint/step-9")
    craft_step(base_step, dump / "checkpoint/step-10", set_value("dataloader.sample_index", -1))
    argv = ["train", "--job.config_file", str(CONFIG), "--job.dump_folder", str(dump), *FAST_ARGS,
            "--training.steps", "10", "--checkpoint.load_only"]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "CORRUPT CHECKPOINT" in out and "dataloader.sample_index is -1" in out
    assert "step-9" in out


def test_step_beyond_training_steps_is_fine(base_step, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SAVEPOINT_DEBUG", raising=False)
    dump = tmp_path / "run"
    craft_step(base_step, dump / "checkpoint/step-10", set_value("train_state.step", 10**12))
    argv = ["train", "--job.config_file", str(CONFIG), "--job.dump_folder", str(dump), *FAST_ARGS,
            "--training.steps", "12"]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "nothing to train" in out


# ---- the checks themselves, without a checkpoint --------------------------------------------------

def test_train_state_accepts_torchtitan_tensors_and_refuses_bools():
    state = TrainState()
    state.load_state_dict({"step": torch.tensor(7, dtype=torch.int32), "ntokens_seen": torch.tensor(70)})
    assert (state.step, state.ntokens_seen) == (7, 70)
    for bad in ({"step": True, "ntokens_seen": 0}, {"step": 1.0, "ntokens_seen": 0},
                {"step": torch.tensor(1.0), "ntokens_seen": 0}, {"step": 1, "ntokens_seen": -1},
                {"step": 1, "ntokens_seen": 0, "rng_state": {"cpu": torch.get_rng_state().float()}}):
        with pytest.raises(LoadedValueError):
            state.load_state_dict(bad)
    assert (state.step, state.ntokens_seen) == (7, 70)


def test_scheduler_refuses_keys_it_does_not_save():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda n: 1.0)
    state = LRSchedulerState(scheduler)
    good = scheduler.state_dict()
    for key, value in (("optimizer", None), ("lr_lambdas", [{"__code__": 1}]), ("_last_lr", [1e-3, 1e-3]),
                       ("_step_count", -1), ("_is_initial", 1)):
        with pytest.raises(LoadedValueError, match=key):
            state.load_state_dict({**good, key: value})
    assert scheduler.optimizer is optimizer
    state.load_state_dict(good)


def test_optimizer_step_counts_are_checked():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    state = OptimizerState(model, optimizer)
    saved = state.state_dict()
    step_key = next(k for k in saved if k.endswith(".step"))
    with pytest.raises(LoadedValueError, match=r"state.weight.step is -3.0 \(a torch.float32 tensor\)"):
        state.load_state_dict({**saved, step_key: torch.tensor(-3.0)})
    with pytest.raises(LoadedValueError, match="a tensor"):
        state.load_state_dict({**saved, step_key.replace(".step", ".exp_avg"): "x"})


@pytest.mark.parametrize("key, value, expect", [
    ("lr", "fast", "lr is 'fast' (str), but it must be a finite number >= 0"),
    ("lr", math.nan, "lr is nan"),
    ("betas", (5.0, 0.95), "betas[0] is 5.0, but it must be a finite number in [0, 1)"),
    ("betas", (0.9,), "a pair of numbers"),
    ("eps", -1.0, "eps is -1.0, but it must be a finite number > 0"),
    ("eps", 0.0, "eps is 0.0"),
    ("weight_decay", math.inf, "weight_decay is inf"),
    ("weight_decay", -1.0, "weight_decay is -1.0"),
    ("foreach", "yes", "true, false or None"),
    ("amsgrad", None, "true or false"),
])
def test_optimizer_hyperparameters_are_checked(key, value, expect):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = OptimizerState(model, optimizer)
    saved = state.state_dict()
    group_key = next(k for k in saved if k.startswith("param_groups.") and k.endswith("." + key))
    with pytest.raises(LoadedValueError) as err:
        state.load_state_dict({**saved, group_key: value})
    assert expect in str(err.value)
    assert optimizer.param_groups[0]["lr"] == 1e-3
    state.load_state_dict(saved)


@pytest.mark.parametrize("key, value", [("last_epoch", "ten"), ("last_epoch", -2), ("base_lrs", [math.nan]),
                                        ("base_lrs", "0.1"), ("_last_lr", [-1.0])])
def test_scheduler_values_are_checked(key, value):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda n: 1.0)
    with pytest.raises(LoadedValueError, match=key):
        LRSchedulerState(scheduler).load_state_dict({**scheduler.state_dict(), key: value})
    assert scheduler.last_epoch == 0


def test_dataloader_position_must_be_addressable():
    loader = build_dataloader("pydocs", 32, 2, seed=0)
    loader.load_state_dict({"sample_index": 40, "dp_degree": 1})
    assert loader.sample_index == 40
    for bad in (-1, 2**63, "40", 40.0, None):
        with pytest.raises(LoadedValueError, match="sample_index"):
            loader.load_state_dict({"sample_index": bad, "dp_degree": 1})
    with pytest.raises(LoadedValueError, match="dp_degree"):
        loader.load_state_dict({"sample_index": 0, "dp_degree": 0})
    assert loader.sample_index == 40
    loader.load_state_dict({"sample_index": loader.stream.max_index})
    loader.next_batch()  # the last addressable position still reads a batch


def test_staged_load_applies_nothing_when_one_component_is_bad(tmp_path):
    loader = build_dataloader("pydocs", 32, 2, seed=0)
    train_state = TrainState()
    staged = StagedLoad()
    staged.wrap("dataloader", loader).load_state_dict({"sample_index": 8, "dp_degree": 1})
    staged.wrap("train_state", train_state).load_state_dict({"step": "4", "ntokens_seen": 0})
    with pytest.raises(CorruptCheckpointError, match=r"step-4: train_state.step is '4' \(str\)"):
        staged.apply(tmp_path / "step-4")
    assert loader.sample_index == 0 and train_state.step == 0
