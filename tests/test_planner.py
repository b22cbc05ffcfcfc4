"""The tiled save planner: large matrices stored as column tiles, loaded back exactly by plain DCP."""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from savepoint.checkpoint import planner as planner_module
from savepoint.checkpoint.planner import TiledSavePlanner


def chunks(path, key):
    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata[key]
    return sorted((tuple(c.offsets), tuple(c.sizes)) for c in meta.chunks)


def test_tiles_by_columns_and_loads_back_exactly(tmp_path):
    gen = torch.Generator().manual_seed(0)
    state = {
        "big": torch.randn(64, 1024, generator=gen),  # 256 KiB: 8 tiles of 128 columns at a 16 KiB minimum
        "narrow": torch.randn(64, 24, generator=gen),  # 6 KiB: below the minimum, stays one chunk
        "odd": torch.randn(64, 1000, generator=gen),  # 1000 = 8 x 125: 8 tiles
        "vector": torch.randn(4096, generator=gen),  # 1-D: never tiled
        "bf16": torch.randn(128, 512, generator=gen).to(torch.bfloat16),
        "meta": {"step": 7},
    }
    planner = TiledSavePlanner(min_tile_bytes=16 * 1024)
    dcp.save(state, checkpoint_id=tmp_path / "ckpt", planner=planner, no_dist=True)

    assert chunks(tmp_path / "ckpt", "big") == [((0, 128 * t), (64, 128)) for t in range(8)]
    assert chunks(tmp_path / "ckpt", "narrow") == [((0, 0), (64, 24))]
    assert chunks(tmp_path / "ckpt", "odd") == [((0, 125 * t), (64, 125)) for t in range(8)]
    assert chunks(tmp_path / "ckpt", "vector") == [((0,), (4096,))]
    assert len(chunks(tmp_path / "ckpt", "bf16")) == 8  # 128 x 64 x 2 bytes = 16 KiB per tile

    # no storage bloat: views are written as their own bytes, not their base tensor's
    data_bytes = sum(p.stat().st_size for p in (tmp_path / "ckpt").glob("*.distcp"))
    tensor_bytes = sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
    assert tensor_bytes <= data_bytes < tensor_bytes * 1.1

    loaded = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else {"step": 0} for k, v in state.items()}
    dcp.load(loaded, checkpoint_id=tmp_path / "ckpt", no_dist=True)
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(loaded[key], value) and loaded[key].dtype == value.dtype, key
    assert loaded["meta"]["step"] == 7

    # a standard DCP checkpoint: format_utils reassembles the full tensors
    dcp_to_torch_save(tmp_path / "ckpt", tmp_path / "full.pt")
    full = torch.load(tmp_path / "full.pt")
    assert torch.equal(full["big"], state["big"]) and torch.equal(full["odd"], state["odd"])


def test_small_tensors_stay_whole_at_the_default_threshold(tmp_path, monkeypatch):
    monkeypatch.setattr(planner_module, "MIN_TILE_BYTES", 1 << 20)  # conftest lowers it for the other tests
    state = {"w": torch.randn(256, 256)}  # 256 KiB < the 1 MiB default tile minimum
    dcp.save(state, checkpoint_id=tmp_path / "ckpt", planner=TiledSavePlanner(), no_dist=True)
    assert chunks(tmp_path / "ckpt", "w") == [((0, 0), (256, 256))]


def test_tile_if_chooses_the_keys(tmp_path):
    from savepoint.models.llama3.parallelize import column_sharded

    state = {"layers.0.attention.wo.weight": torch.randn(64, 512), "layers.0.attention.wq.weight": torch.randn(64, 512),
             "optimizer": {"state": {"layers.0.attention.wo.weight": {"exp_avg": torch.randn(64, 512)}}}}
    planner = TiledSavePlanner(tile_if=column_sharded, min_tile_bytes=16 * 1024)
    dcp.save(state, checkpoint_id=tmp_path / "ckpt", planner=planner, no_dist=True)
    assert len(chunks(tmp_path / "ckpt", "layers.0.attention.wo.weight")) == 8
    assert len(chunks(tmp_path / "ckpt", "optimizer.state.layers.0.attention.wo.weight.exp_avg")) == 8
    assert len(chunks(tmp_path / "ckpt", "layers.0.attention.wq.weight")) == 1  # row-sharded under TP: whole
