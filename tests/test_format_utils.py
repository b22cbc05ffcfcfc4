"""``python -m torch.distributed.checkpoint.format_utils dcp_to_torch`` on savepoint checkpoints.

The seed doc promises that any step folder converts to one ``torch.save`` file with torch's own CLI.
These tests run that CLI exactly as a user would and check the file against the trainer's live state.
The 2-rank (FSDP, TP) case lives in tests/test_distributed.py, which owns those checkpoints.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# Per-parameter AdamW state, as the flattened optimizer stores it: optimizer -> {"state.<fqn>.<name>": ...}.
ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")


def dcp_to_torch(step_dir: Path, out: Path) -> dict:
    """Run the CLI on ``step_dir``, then load ``out`` the safe way (``weights_only=True``)."""
    cmd = [sys.executable, "-m", "torch.distributed.checkpoint.format_utils", "dcp_to_torch", str(step_dir), str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"dcp_to_torch failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return torch.load(out, weights_only=True)


def check_dcp_to_torch(step_dir: Path, expected_model_state: dict[str, torch.Tensor],
                       optimizer: bool = True) -> dict:
    """Convert ``step_dir`` with the CLI and check the result; returns the loaded ``.pt`` contents.

    Checks that the file loads with ``weights_only=True``; that its model tensors sit flat at the top
    level, under exactly the keys of ``expected_model_state`` and equal to them bit for bit (dtype
    included); and that AdamW's state for every parameter is there (``optimizer=True``) or that no
    optimizer is (``optimizer=False``, model-only checkpoints). The ``.pt`` goes to a temporary folder,
    never next to the checkpoint.
    """
    with tempfile.TemporaryDirectory() as tmp:
        loaded = dcp_to_torch(step_dir, Path(tmp) / "out.pt")
    tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    assert tensors.keys() == expected_model_state.keys(), sorted(tensors.keys() ^ expected_model_state.keys())[:5]
    bad = [k for k, v in expected_model_state.items() if tensors[k].dtype != v.dtype or not torch.equal(tensors[k], v)]
    assert not bad, f"{len(bad)} model tensors differ, e.g. {bad[:3]}"
    if optimizer:
        state = loaded["optimizer"]
        missing = [f"state.{k}.{n}" for k in expected_model_state for n in ADAM_STATE if f"state.{k}.{n}" not in state]
        assert not missing, f"optimizer state missing, e.g. {missing[:3]}"
        assert all(f"param_groups.{k}.lr" in state for k in expected_model_state)
    else:
        assert set(loaded) == set(expected_model_state), "a model-only checkpoint should hold only the model"
    return loaded


def optimizer_state(trainer) -> dict[str, torch.Tensor]:
    """The live AdamW state, keyed like the flattened checkpoint: ``state.<fqn>.<name>``."""
    names = {p: n for n, p in trainer.model.named_parameters()}
    return {f"state.{names[p]}.{k}": v for p, s in trainer.optimizer.state.items() for k, v in s.items()}


def test_full_checkpoint(train, tmp_path):
    trainer = train(stop_after=5)
    loaded = check_dcp_to_torch(tmp_path / "run/checkpoint/step-5", trainer.model.state_dict())
    live = optimizer_state(trainer)
    saved = {k: v for k, v in loaded["optimizer"].items() if isinstance(v, torch.Tensor)}
    assert saved.keys() == live.keys()
    assert all(torch.equal(saved[k], v) for k, v in live.items())
    assert loaded["optimizer"]["param_groups.output.weight.lr"] == trainer.optimizer.param_groups[0]["lr"]
    assert loaded["train_state"]["step"] == 5 and loaded["dataloader"]["sample_index"] == 10
    assert loaded["lr_scheduler"]["last_epoch"] == 5
    assert loaded["train_state"]["rng_state"]["cpu"].dtype == torch.uint8


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_only_checkpoint(train, tmp_path, dtype):
    trainer = train("--training.steps", "3", "--checkpoint.last_save_model_only", "--checkpoint.export_dtype", dtype)
    expected = {k: v.to(getattr(torch, dtype)) for k, v in trainer.model.state_dict().items()}
    check_dcp_to_torch(tmp_path / "run/checkpoint/step-3", expected, optimizer=False)


def test_cli_failure_is_reported(tmp_path):
    """A folder that is no checkpoint makes the CLI fail (rc != 0), which the helper turns into an assertion."""
    (tmp_path / "step-1").mkdir()
    with pytest.raises(AssertionError, match="dcp_to_torch failed"):
        dcp_to_torch(tmp_path / "step-1", tmp_path / "out.pt")
