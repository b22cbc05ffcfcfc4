"""A savepoint DCP checkpoint loaded into torchtune's Llama 3 models: same logits, no q/k permutation.

Needs torchtune (``pip install torchtune==0.6.1 torchao==0.15.0 "torch==2.13.0"``); skipped without it.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.distributed.checkpoint as dcp

from savepoint.checkpoint.compat import save_v03_model_checkpoint
from savepoint.convert.torchtune import (
    build_torchtune_model,
    from_torchtune,
    to_torchtune,
    to_torchtune_state_dict,
    torchtune_builder,
)
from savepoint.errors import CheckpointError, SavepointError
from savepoint.models.llama3 import LLAMA3_FLAVORS, ModelArgs, build_model

pytest.importorskip("torchtune")

# GQA (4 query heads, 2 kv heads), an MLP width where torchtune's default formula differs (192 vs 256),
# and a head_dim/theta for which Llama 3.1 scaling changes the low frequencies.
ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, max_seq_len=64)
TOLERANCE = 1e-5
DEBUG = LLAMA3_FLAVORS["debugmodel"]


def tiny_model(args: ModelArgs):
    """A savepoint model with every weight (norms included) visibly away from its init."""
    model = build_model(args, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.eval()


def tokens() -> torch.Tensor:
    return torch.randint(0, ARGS.vocab_size, (2, 48), generator=torch.Generator().manual_seed(2))


def torchtune_logits(args: ModelArgs, state: dict[str, torch.Tensor]) -> torch.Tensor:
    tune = build_torchtune_model(args).eval()
    tune.load_state_dict(state, strict=True)
    with torch.no_grad():
        return tune(tokens())


@pytest.mark.parametrize("scaled_rope", [True, False], ids=["llama3_1", "llama3"])
def test_model_only_checkpoint_gives_the_same_logits(tmp_path, scaled_rope):
    args = replace(ARGS, use_scaled_rope=scaled_rope)
    assert torchtune_builder(args)[0] == ("llama3_1" if scaled_rope else "llama3")
    model = tiny_model(args)
    dcp.save(model.state_dict(), checkpoint_id=str(tmp_path / "step-3"), no_dist=True)

    state = to_torchtune_state_dict(tmp_path / "step-3", args)
    assert "layers.1.attn.q_proj.weight" in state and "norm.scale" in state and "output.weight" in state
    with torch.no_grad():
        ours = model(tokens())
    theirs = torchtune_logits(args, state)
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max().item() <= TOLERANCE
    # q/k go across unpermuted: both RoPEs rotate interleaved pairs. HF's permutation would break it.
    assert torch.equal(state["layers.0.attn.q_proj.weight"], model.layers["0"].attention.wq.weight)


def test_hf_style_permutation_would_be_wrong(tmp_path):
    """The logits check is sensitive to q/k row order: permuting as for HF moves them far off."""
    model = tiny_model(ARGS)
    state = to_torchtune(model.state_dict())
    for i in range(ARGS.n_layers):
        for name, heads in (("q_proj", ARGS.n_heads), ("k_proj", ARGS.num_kv_heads)):
            w = state[f"layers.{i}.attn.{name}.weight"]
            rows, cols = w.shape
            state[f"layers.{i}.attn.{name}.weight"] = (
                w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols))
    with torch.no_grad():
        ours = model(tokens())
    assert (torchtune_logits(ARGS, state) - ours).abs().max().item() > 100 * TOLERANCE


def test_full_and_torchtitan_0_3_checkpoints(tmp_path):
    """Only model keys are read from a full checkpoint; a TorchTitan 0.3 layout is read through its names."""
    model = tiny_model(ARGS)
    expected = to_torchtune(model.state_dict())
    full = {**model.state_dict(), "optimizer": {"state.output.weight.exp_avg": torch.zeros(256, 64)},
            "train_state": {"step": 3}}
    dcp.save(full, checkpoint_id=str(tmp_path / "full"), no_dist=True)
    save_v03_model_checkpoint(model.state_dict(), tmp_path / "v03")
    for step_dir in (tmp_path / "full", tmp_path / "v03"):
        got = to_torchtune_state_dict(step_dir, ARGS)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], v) for k, v in expected.items()), step_dir.name


def test_bf16_export_keeps_its_dtype_and_loads(tmp_path):
    model = tiny_model(ARGS)
    dcp.save({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()},
             checkpoint_id=str(tmp_path / "bf16"), no_dist=True)
    state = to_torchtune_state_dict(tmp_path / "bf16", ARGS)
    assert all(v.dtype == torch.bfloat16 for v in state.values())
    assert to_torchtune_state_dict(tmp_path / "bf16", ARGS, dtype=torch.float32)["norm.scale"].dtype == torch.float32
    build_torchtune_model(ARGS).load_state_dict(state, strict=True)


def test_key_table_round_trips_torchtune_own_keys():
    tune_keys = set(build_torchtune_model(ARGS).state_dict())
    ours = tiny_model(ARGS).state_dict()
    assert set(to_torchtune(ours)) == tune_keys
    assert from_torchtune(to_torchtune(ours)).keys() == ours.keys()


def test_wrong_args_and_unsupported_rope_are_clear_errors(tmp_path):
    dcp.save(tiny_model(ARGS).state_dict(), checkpoint_id=str(tmp_path / "step-1"), no_dist=True)
    with pytest.raises(CheckpointError, match=r"layers.2.attention.wq.weight"):
        to_torchtune_state_dict(tmp_path / "step-1", replace(ARGS, n_layers=3))
    with pytest.raises(CheckpointError, match=r"tok_embeddings.weight.*shape"):
        to_torchtune_state_dict(tmp_path / "step-1", replace(ARGS, vocab_size=512))
    with pytest.raises(CheckpointError, match="no .metadata"):
        to_torchtune_state_dict(tmp_path, ARGS)
    with pytest.raises(SavepointError, match="rope_original_max_pos=4096"):
        torchtune_builder(replace(ARGS, rope_original_max_pos=4096))


def test_convert_to_torchtune_command(tmp_path):
    """``savepoint convert to_torchtune`` writes a .pt that torchtune's model loads strictly."""
    import subprocess
    import sys

    from savepoint.convert.torchtune import build_torchtune_model
    from savepoint.models.llama3 import LLAMA3_FLAVORS, build_model
    from tests.conftest import ROOT

    args = LLAMA3_FLAVORS["debugmodel"]
    model = build_model(args.with_max_seq_len(32), seed=3)
    dcp.save(model.state_dict(), checkpoint_id=tmp_path / "step-0", no_dist=True)
    cmd = [sys.executable, "-m", "savepoint", "convert", "to_torchtune", str(tmp_path / "step-0"),
           str(tmp_path / "tune.pt"), "--model_flavor", "debugmodel"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "model.load_state_dict" in proc.stdout
    tune = build_torchtune_model(args, max_seq_len=32)
    tune.load_state_dict(torch.load(tmp_path / "tune.pt", weights_only=True), strict=True)
    tokens = torch.randint(0, args.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (tune(tokens) - model(tokens)).abs().max().item() < 1e-5
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 1 and "already exists" in again.stderr



def test_stock_torchtune_loads_a_model_only_step(train, tmp_path):
    """The documented path, with nothing of savepoint's: dcp_to_torch, FullModelMetaCheckpointer, llama3_1."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from torchtune.models.llama3_1 import llama3_1
    from torchtune.training import FullModelMetaCheckpointer

    trainer = train("--checkpoint.last_save_model_only", "--training.steps", "6")
    step = tmp_path / "run" / "checkpoint" / "step-6"
    assert not any(k.startswith("optimizer") for k in dcp.FileSystemReader(str(step)).read_metadata()
                   .state_dict_metadata)

    (tmp_path / "pt").mkdir()
    dcp_to_torch_save(str(step), str(tmp_path / "pt" / "step-6.pt"))
    checkpointer = FullModelMetaCheckpointer(checkpoint_dir=str(tmp_path / "pt"), checkpoint_files=["step-6.pt"],
                                             model_type="LLAMA3", output_dir=str(tmp_path / "tune_out"))
    state = checkpointer.load_checkpoint()["model"]
    f = DEBUG
    kwargs = dict(vocab_size=f.vocab_size, num_layers=f.n_layers, num_heads=f.n_heads, num_kv_heads=f.n_kv_heads,
                  embed_dim=f.dim, max_seq_len=f.max_seq_len, rope_base=f.rope_theta,
                  intermediate_dim=f.ffn_hidden_dim, norm_eps=f.norm_eps, scale_factor=f.rope_scaling_factor)
    assert kwargs == {"vocab_size": 2048, "num_layers": 6, "num_heads": 16, "num_kv_heads": 8, "embed_dim": 256,
                      "max_seq_len": 2048, "rope_base": 500000.0, "intermediate_dim": 768, "norm_eps": 1e-05,
                      "scale_factor": 8.0}  # the README's call, spelled out
    assert torchtune_builder(f) == ("llama3_1", kwargs)
    model = llama3_1(**kwargs)
    model.load_state_dict(state, strict=True)
    tokens = torch.randint(0, f.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model.eval()(tokens) - trainer.model.eval()(tokens)).abs().max().item()
    assert diff < 1e-5, diff  # float32 rounding over 2048 logits


def test_stock_torchtune_path_refuses_a_full_step(train, tmp_path):
    """What ``convert to_torchtune`` adds: the model of a full training step (the stock checkpointer
    stops at the optimizer's keys)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from torchtune.training import FullModelMetaCheckpointer

    train(stop_after=5)
    step = tmp_path / "run" / "checkpoint" / "step-5"
    (tmp_path / "pt").mkdir()
    dcp_to_torch_save(str(step), str(tmp_path / "pt" / "step-5.pt"))
    checkpointer = FullModelMetaCheckpointer(checkpoint_dir=str(tmp_path / "pt"), checkpoint_files=["step-5.pt"],
                                             model_type="LLAMA3", output_dir=str(tmp_path / "tune_out"))
    with pytest.raises(Exception, match='unexpected key: "(optimizer|lr_scheduler|dataloader|train_state)'):
        checkpointer.load_checkpoint()
    build_torchtune_model(DEBUG).load_state_dict(to_torchtune_state_dict(step, DEBUG), strict=True)
