"""TorchTitan 0.3 key layout: detection from checkpoint keys, the key mapping, and a real DCP round trip."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from savepoint.checkpoint.compat import (
    UNKNOWN,
    V02,
    V03,
    detect_layout,
    from_v03_key,
    save_v03_model_checkpoint,
    saved_model_keys,
    to_v03_key,
)
from savepoint.models.llama3 import LLAMA3_FLAVORS, build_model

OURS = ["tok_embeddings.weight", "layers.0.attention.wq.weight", "layers.0.attention.wk.weight",
        "layers.0.attention.wv.weight", "layers.0.attention.wo.weight", "layers.0.feed_forward.w1.weight",
        "layers.0.feed_forward.w2.weight", "layers.0.feed_forward.w3.weight", "layers.0.attention_norm.weight",
        "layers.0.ffn_norm.weight", "layers.11.attention.wq.weight", "norm.weight", "output.weight"]
V03_NAMES = {
    "layers.0.attention.wq.weight": "layers.0.attention.qkv_linear.wq.weight",
    "layers.0.attention.wk.weight": "layers.0.attention.qkv_linear.wk.weight",
    "layers.0.attention.wv.weight": "layers.0.attention.qkv_linear.wv.weight",
    "layers.11.attention.wq.weight": "layers.11.attention.qkv_linear.wq.weight",
    "output.weight": "lm_head.weight",
}
OPTIMIZER = ["optimizer.state.{}.exp_avg", "optimizer.state.{}.step", "optimizer.param_groups.{}.lr"]


def v03(keys):
    return [V03_NAMES.get(k, k) for k in keys]


def full_checkpoint_keys(model_keys):
    """The keys a full training checkpoint of these model keys has (model, optimizer, other components)."""
    optimizer = [t.format(k) for k in model_keys for t in OPTIMIZER]
    return [*model_keys, *optimizer, "lr_scheduler.last_epoch", "dataloader.sample_index", "train_state.step"]


def test_key_renames_follow_torchtitan_0_3():
    assert {k: to_v03_key(k) for k in OURS if to_v03_key(k) != k} == V03_NAMES
    assert to_v03_key("optimizer.state.layers.3.attention.wk.weight.exp_avg_sq") == \
        "optimizer.state.layers.3.attention.qkv_linear.wk.weight.exp_avg_sq"
    assert to_v03_key("optimizer.param_groups.output.weight.betas") == "optimizer.param_groups.lm_head.weight.betas"
    assert to_v03_key("state.output.weight.step") == "state.lm_head.weight.step"  # OptimizerState's own keys
    for unchanged in ("layers.0.attention.wo.weight", "optimizer.state.norm.weight.exp_avg",
                      "optimizer.state.layers.2.feed_forward.w1.weight.step", "lr_scheduler.last_epoch",
                      "layers.0.attention.wq.weight_extra"):
        assert to_v03_key(unchanged) == unchanged
    for key in full_checkpoint_keys(OURS):
        assert from_v03_key(to_v03_key(key)) == key


@pytest.mark.parametrize("with_optimizer", [False, True])
def test_detects_both_layouts(with_optimizer):
    keys = full_checkpoint_keys if with_optimizer else list
    assert detect_layout(keys(OURS)) == V02
    assert detect_layout(keys(v03(OURS))) == V03
    # a 0.3 checkpoint is recognised from either kind of renamed tensor alone
    assert detect_layout([k for k in v03(OURS) if k != "lm_head.weight"]) == V03
    assert detect_layout([k for k in v03(OURS) if ".qkv_linear." not in k]) == V03


def test_mixed_or_unknown_layouts_are_unknown():
    mixed = [*OURS, "lm_head.weight"]
    assert detect_layout(mixed) == UNKNOWN
    assert detect_layout([*v03(OURS), "layers.0.attention.wq.weight"]) == UNKNOWN
    assert detect_layout(["tok_embeddings.weight", "norm.weight"]) == UNKNOWN
    assert detect_layout([]) == UNKNOWN
    # optimizer keys alone do not decide: only top-level model keys are looked at
    assert detect_layout(["optimizer.state.lm_head.weight.exp_avg"]) == UNKNOWN


def test_saved_model_keys_mapping():
    assert saved_model_keys(OURS, OURS) == {k: k for k in OURS}
    assert saved_model_keys(OURS, full_checkpoint_keys(OURS)) == {k: k for k in OURS}
    to_v03 = saved_model_keys(OURS, full_checkpoint_keys(v03(OURS)))
    assert list(to_v03) == OURS and to_v03 == {k: V03_NAMES.get(k, k) for k in OURS}
    # mixed and unrecognised layouts: identity, so the caller's missing-key check names the tensor
    assert saved_model_keys(OURS, [*OURS, "lm_head.weight"]) == {k: k for k in OURS}
    assert saved_model_keys(OURS, ["tok_embeddings.weight"]) == {k: k for k in OURS}
    # dicts work for both arguments (a state dict, .metadata's state_dict_metadata)
    assert saved_model_keys(dict.fromkeys(OURS), dict.fromkeys(v03(OURS))) == to_v03


@pytest.fixture(scope="module")
def model():
    return build_model(LLAMA3_FLAVORS["debugmodel"].with_max_seq_len(32), seed=3)


def test_v03_checkpoint_loads_bit_identical_through_the_mapping(model, tmp_path):
    expected = model.state_dict()
    step = tmp_path / "step-7"
    save_v03_model_checkpoint(expected, step)
    saved = FileSystemReader(str(step)).read_metadata().state_dict_metadata
    assert "lm_head.weight" in saved and "layers.5.attention.qkv_linear.wv.weight" in saved
    assert "output.weight" not in saved and "layers.0.attention.wq.weight" not in saved
    assert detect_layout(saved) == V03

    names = saved_model_keys(expected, saved)
    assert sorted(names.values()) == sorted(saved)  # every tensor found, nothing left over
    for ours, key in names.items():
        assert tuple(saved[key].size) == tuple(expected[ours].shape), ours
    loaded = {ours: torch.empty_like(t) for ours, t in expected.items()}
    dcp.load({names[k]: t for k, t in loaded.items()}, checkpoint_id=str(step), no_dist=True)
    for key, value in expected.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key


def test_own_checkpoint_maps_to_itself(model, tmp_path):
    dcp.save(model.state_dict(), checkpoint_id=str(tmp_path / "step-1"), no_dist=True)
    saved = FileSystemReader(str(tmp_path / "step-1")).read_metadata().state_dict_metadata
    assert detect_layout(saved) == V02
    assert saved_model_keys(model.state_dict(), saved) == {k: k for k in model.state_dict()}


# ------------------------------------------------------------------------ through the checkpoint manager


def test_manager_loads_a_v03_model_only_checkpoint_as_initial_load(train, tmp_path):
    from savepoint.checkpoint.compat import save_v03_model_checkpoint

    source = train(stop_after=5, dump=tmp_path / "source")
    save_v03_model_checkpoint(source.model.state_dict(), tmp_path / "v03")
    loaded = train("--checkpoint.initial_load_path", str(tmp_path / "v03"), dump=tmp_path / "fresh", stop_after=0)
    for key, value in source.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


def test_manager_resumes_a_full_v03_checkpoint_bit_exactly(train, tmp_path):
    """A full TorchTitan 0.3 checkpoint (model and optimizer under 0.3 names) resumes like our own."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from savepoint.checkpoint.compat import to_v03_key
    from tests.conftest import losses

    straight = train(dump=tmp_path / "straight")
    train(stop_after=5, dump=tmp_path / "ours")
    dcp_to_torch_save(tmp_path / "ours/checkpoint/step-5", tmp_path / "ours.pt")
    ours = torch.load(tmp_path / "ours.pt", weights_only=False)
    components = ("optimizer", "lr_scheduler", "dataloader", "train_state")
    v03 = {to_v03_key(k): v for k, v in ours.items() if k not in components}
    v03["optimizer"] = {to_v03_key(k): v for k, v in ours["optimizer"].items()}
    v03.update({k: ours[k] for k in components if k != "optimizer"})
    assert "layers.0.attention.qkv_linear.wq.weight" in v03 and "lm_head.weight" in v03
    dcp.save(v03, checkpoint_id=tmp_path / "v03run/checkpoint/step-5", no_dist=True)

    resumed = train(dump=tmp_path / "v03run")
    expected, got = losses(tmp_path / "straight"), losses(tmp_path / "v03run")
    assert [got[s] for s in range(6, 21)] == [expected[s] for s in range(6, 21)]
    for key, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
