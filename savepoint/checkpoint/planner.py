"""A DCP save planner that stores large matrices as column tiles, so resharded loads read less.

DCP's ``FileSystemReader`` reads every stored chunk that a load request overlaps in full, then
narrows it. Chunks are what each rank held at save time: under FSDP, blocks of rows. Tensor
parallelism splits ``wo`` and ``w2`` (and their Adam moments) by *columns*, so a TP rank loading
an FSDP checkpoint overlaps every row chunk of those tensors and reads all of them: about 20 %
more bytes than a same-layout load of a Llama (see ``benchmarks/reshard.py``).

Storing each chunk of such a tensor as up to ``tiles`` column tiles (each contiguous on disk)
lets a column-sharded request read only the tiles it needs; row-sharded requests read the same
bytes as before. Tiles cost a copy when the state is in CPU memory (the writer must make each
column tile contiguous), so only the tensors the model's plan shards by columns are tiled (for
Llama: ``wo`` and ``w2``, about a fifth of the bytes). The checkpoint stays a standard DCP
checkpoint: a tile is one more chunk in ``.metadata``, and every DCP reader (TorchTitan's,
``dcp_to_torch``) loads it unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

# Column tiles per chunk: 8 aligns with tensor-parallel degrees 2, 4 and 8.
DEFAULT_TILES = 8
# Tiles smaller than this cost more in per-item overhead than they save in bytes read.
MIN_TILE_BYTES = 1 << 20


class TiledSavePlanner(DefaultSavePlanner):
    """``DefaultSavePlanner`` that splits large 2-D chunks of the chosen tensors into equal column tiles.

    Args:
        tile_if: which flattened keys to tile (e.g. ``layers.0.attention.wo.weight`` and its
            ``optimizer.state.<fqn>.exp_avg``); None tiles every large 2-D tensor.
        tiles: the most tiles per chunk (a power of two).
        min_tile_bytes: smaller tiles are not made (default ``MIN_TILE_BYTES``).
    """

    def __init__(self, tile_if: Callable[[str], bool] | None = None, tiles: int = DEFAULT_TILES,
                 min_tile_bytes: int | None = None):
        # No plan caching: a cached plan would skip create_local_plan, which records the tiles.
        super().__init__(enable_plan_caching=False)
        self.tile_if = tile_if
        self.tiles = tiles
        self.min_tile_bytes = MIN_TILE_BYTES if min_tile_bytes is None else min_tile_bytes
        self._tile_of: dict[MetadataIndex, tuple[MetadataIndex, int, int]] = {}  # tile -> (chunk, col, width)

    def create_local_plan(self) -> SavePlan:
        plan = super().create_local_plan()
        items = [tile for item in plan.items for tile in self._split(item)]
        self.plan = SavePlan(items, storage_data=plan.storage_data, planner_data=plan.planner_data,
                             usable=plan.usable)
        return self.plan

    def _tile_count(self, item: WriteItem) -> int:
        """The largest power of two <= ``tiles`` that divides the columns into tiles of >= min_tile_bytes."""
        data = item.tensor_data
        if item.type == WriteItemType.BYTE_IO or data is None or len(data.chunk.sizes) != 2:
            return 1
        if self.tile_if is not None and not self.tile_if(item.index.fqn):
            return 1
        rows, cols = data.chunk.sizes
        itemsize = data.properties.dtype.itemsize
        count = self.tiles
        while count > 1 and (cols % count or rows * (cols // count) * itemsize < self.min_tile_bytes):
            count //= 2
        return count

    def _split(self, item: WriteItem) -> list[WriteItem]:
        count = self._tile_count(item)
        if count == 1:
            return [item]
        data = item.tensor_data
        row0, col0 = data.chunk.offsets
        rows, cols = data.chunk.sizes
        width = cols // count
        tiles = []
        for t in range(count):
            offsets = torch.Size([row0, col0 + t * width])
            index = MetadataIndex(item.index.fqn, offsets)
            self._tile_of[index] = (item.index, t * width, width)
            chunk = ChunkStorageMetadata(offsets=offsets, sizes=torch.Size([rows, width]))
            tensor_data = TensorWriteData(chunk=chunk, properties=data.properties, size=data.size)
            tiles.append(WriteItem(index=index, type=WriteItemType.SHARD, tensor_data=tensor_data))
        return tiles

    def resolve_data(self, write_item: WriteItem) -> Any:
        tile = self._tile_of.get(write_item.index)  # MetadataIndex equality ignores the index hint
        if tile is None:
            return super().resolve_data(write_item)
        chunk_index, start, width = tile
        return self.lookup_object(chunk_index).narrow(1, start, width)  # the writer copies views out
