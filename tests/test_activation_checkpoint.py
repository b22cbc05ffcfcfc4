"""Activation checkpointing: the same numbers as without it, fewer saved activations, unchanged checkpoint keys."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from savepoint.checkpoint.storage import CheckpointFolder
from savepoint.errors import ConfigError
from savepoint.hf.folder import HFFolder
from savepoint.hf.llama3 import to_hf_key
from savepoint.models.llama3 import LLAMA3_FLAVORS, build_model
from savepoint.models.llama3.activation_checkpoint import apply_ac, check_ac_options, checkpointed_blocks
from tests.conftest import losses
from tests.test_resume import assert_bit_identical

# Small enough that five modes x two steps take a second or two.
TINY = dataclasses.replace(LLAMA3_FLAVORS["debugmodel"], dim=64, n_layers=4, n_heads=4, n_kv_heads=2,
                           vocab_size=256).with_max_seq_len(16)
MODES = [("none", "2"), ("full", "2"), ("selective", "2"), ("selective", "op"), ("selective", "1")]


def ac_args(mode: str, option: str) -> tuple[str, ...]:
    return ("--activation_checkpoint.mode", mode, "--activation_checkpoint.selective_ac_option", option)


def run_steps(mode: str, option: str) -> tuple[list[float], dict[str, torch.Tensor], int]:
    """Two SGD steps of the debug model; returns the losses, the last gradients and the saved-tensor count."""
    model = build_model(TINY, seed=0)
    apply_ac(model, mode, option)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tokens = torch.randint(0, model.args.vocab_size, (2, 2, 17), generator=torch.Generator().manual_seed(1))
    saved, out = [0], []
    for batch in tokens:
        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[0] += 1
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        out.append(loss.item())
        optimizer.step()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        optimizer.zero_grad()
    return out, grads, saved[0]


def test_every_mode_gives_the_numbers_of_no_checkpointing():
    ref_losses, ref_grads, ref_saved = run_steps("none", "2")
    for mode, option in MODES[1:]:
        got_losses, got_grads, saved = run_steps(mode, option)
        assert got_losses == ref_losses, (mode, option)  # bit for bit
        assert_bit_identical(ref_grads, got_grads)
        assert saved < ref_saved, (mode, option, saved, ref_saved)  # activations really were dropped


def test_which_blocks_are_checkpointed():
    ids = [str(i) for i in range(6)]
    assert checkpointed_blocks(ids, "selective", "2") == {"1": "full", "3": "full", "5": "full"}
    assert checkpointed_blocks(ids[2:4], "selective", "3") == {"2": "full"}  # global ids: a pipeline stage
    assert checkpointed_blocks(ids, "selective", "op") == dict.fromkeys(ids, "op")
    assert checkpointed_blocks(ids, "none", "2") == {}
    model = build_model(LLAMA3_FLAVORS["debugmodel"].with_max_seq_len(16), seed=0)
    names, keys = [n for n, _ in model.named_parameters()], list(model.state_dict())
    apply_ac(model, "full", "2")
    assert [n for n, _ in model.named_parameters()] == names and list(model.state_dict()) == keys
    assert "layers.0.attention.wq.weight" in keys


def test_memory_budget_is_not_supported_yet():
    assert "'memory_budget' is not supported yet" in check_ac_options("memory_budget", "2")
    assert check_ac_options("selective", "op") is None and check_ac_options("full", "x") is None


def test_checkpoints_load_across_modes(train, tmp_path):
    steps = ("--training.steps", "4", "--checkpoint.interval", "3", "--training.seq_len", "16")
    hf_final = ("--checkpoint.last_save_model_only", "--checkpoint.last_save_in_hf")
    train(*steps, *ac_args("none", "2"), dump=tmp_path / "a", stop_after=3)
    a = train(*steps, *ac_args("selective", "op"), *hf_final, dump=tmp_path / "a")  # loads a no-AC checkpoint
    train(*steps, *ac_args("full", "2"), dump=tmp_path / "b", stop_after=3)
    b = train(*steps, *ac_args("none", "2"), dump=tmp_path / "b")  # loads a full-AC checkpoint
    assert losses(tmp_path / "a") == losses(tmp_path / "b")  # bit for bit, all 4 steps
    assert_bit_identical(a.model.state_dict(), b.model.state_dict())
    keys = [set(FileSystemReader(str(tmp_path / run / "checkpoint/step-3")).read_metadata().state_dict_metadata)
            for run in ("a", "b")]
    assert keys[0] == keys[1] and "layers.0.attention.wq.weight" in keys[0]
    assert not [k for k in keys[0] if "checkpoint" in k or "_orig_mod" in k]
    assert CheckpointFolder(tmp_path / "a/checkpoint").committed_steps() == [3, 4]
    assert sorted(HFFolder(tmp_path / "a/checkpoint/step-4").keys()) == sorted(map(to_hf_key, a.model.state_dict()))


@pytest.mark.parametrize(("mode", "option", "match"), [
    ("partial", "2", "activation_checkpoint.mode"),
    ("selective", "0", "activation_checkpoint.selective_ac_option is '0'; use 'op' or a positive integer"),
    ("selective", "ops", "activation_checkpoint.selective_ac_option is 'ops'"),
])
def test_bad_options_are_refused(train, mode, option, match):
    with pytest.raises(ConfigError, match=match):
        train(*ac_args(mode, option))


@pytest.mark.slow  # compiling takes a minute or more on a 2-core CPU; run with -m slow
def test_compiled_blocks_and_loss_match_eager(train, tmp_path):
    short = ("--training.seq_len", "16", "--training.steps", "3", "--checkpoint.no_enable")
    eager = train(*short, dump=tmp_path / "eager")
    compiled = train(*short, "--compile.enable", "--activation_checkpoint.mode", "full", dump=tmp_path / "compiled")
    assert list(compiled.model.state_dict()) == list(eager.model.state_dict())  # compile renames nothing
    expected, got = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert sorted(got) == [1, 2, 3]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-5, rel=0), step


def test_inductor_without_a_cpp_compiler_fails_before_training(train, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    with pytest.raises(ConfigError, match="inductor backend needs a C\\+\\+ compiler on CPU"):
        train("--compile.enable")
