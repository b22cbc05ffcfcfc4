"""The parallelize plan for Llama 3: tensor parallelism (with sequence parallelism), activation
checkpointing, ``torch.compile`` of each block, then FSDP2 / HSDP.

Applied to the model (or a pipeline stage) on the meta device, before it is materialised, in
TorchTitan's order: TP first, then activation checkpointing and compile per block, then
``fully_shard`` over the data-parallel mesh, so that FSDP shards the TP shards and gathers a
checkpointed block's weights again for its recomputation. None of these steps renames a parameter.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from savepoint.models.llama3.activation_checkpoint import apply_ac
from savepoint.models.llama3.model import Transformer
from savepoint.parallel_dims import ParallelDims

logger = logging.getLogger(__name__)

# Weights that tensor parallelism shards by columns (row-wise parallel linears: Shard(1)).
COLUMN_SHARDED = (".attention.wo.weight", ".feed_forward.w2.weight")


def column_sharded(key: str) -> bool:
    """Whether a checkpoint key (a weight, or its optimizer state) belongs to a column-sharded weight.

    The checkpointer stores these as column tiles (``savepoint.checkpoint.planner``), so that a TP
    load of an FSDP checkpoint reads only the columns it keeps.
    """
    return any(name in key for name in COLUMN_SHARDED)


@dataclass(frozen=True)
class BlockOptions:
    """What happens to each transformer block between TP and FSDP: activation checkpointing and compile."""

    ac_mode: str = "none"  # none, full, selective (see activation_checkpoint)
    ac_option: str = "2"  # with selective: every N-th block, or "op"
    compile_backend: str | None = None  # torch.compile backend for each block; None: eager


def parallelize_llama(model: Transformer, mesh: DeviceMesh | None, dims: ParallelDims,
                      mp_policy: MixedPrecisionPolicy | None = None, blocks: BlockOptions | None = None) -> None:
    """Shard ``model`` in place as ``dims`` says, on the mesh built by ``savepoint.distributed.build_mesh``
    (None for one process), checkpointing and compiling its blocks as ``blocks`` says."""
    if dims.tp > 1:
        assert mesh is not None
        apply_tp(model, mesh["tp"])
    blocks = blocks or BlockOptions()
    chosen = apply_ac(model, blocks.ac_mode, blocks.ac_option)
    if chosen:
        logger.info("activation checkpointing (%s): blocks %s", blocks.ac_mode, ", ".join(
            f"{i} ({kind})" for i, kind in chosen.items()))
    if blocks.compile_backend is not None:
        apply_compile(model, blocks.compile_backend)
    if dims.fsdp:
        assert mesh is not None
        dp_mesh = mesh["dp_replicate", "dp_shard"] if dims.dp_replicate > 1 else mesh["dp_shard"]
        apply_fsdp(model, dp_mesh, mp_policy or MixedPrecisionPolicy())
    if mesh is not None:
        logger.info("parallelized %s", dims.describe())


def apply_compile(model: Transformer, backend: str) -> None:
    """``torch.compile`` each block in place (``Module.compile``: the same module, the same names).

    The blocks share one structure, so they share the compiled code; compilation starts at the first call.
    """
    layers = getattr(model, "layers", None)
    for block in (layers.values() if layers is not None else ()):
        block.compile(backend=backend, fullgraph=True)
    logger.info("compiling each transformer block with torch.compile (backend %s)", backend)


def apply_tp(model: Transformer, tp_mesh: DeviceMesh) -> None:
    """Megatron-style TP with sequence parallelism: activations between blocks are sharded on the sequence.

    - embeddings: rows (vocabulary) sharded, output sharded on the sequence;
    - attention: wq/wk/wv column-wise (each rank holds whole heads), wo row-wise;
    - feed-forward: w1/w3 column-wise, w2 row-wise;
    - norms: sequence parallel (weights replicated);
    - output: column-wise (vocabulary), logits gathered to full size for the loss.
    """
    plan = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate(), use_local_output=True),
    }
    # A pipeline stage holds only some of these; blocks pass sequence-sharded local tensors either way.
    parallelize_module(model, tp_mesh, {k: v for k, v in plan.items() if _present(model, k)})
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, {
            "attention_norm": SequenceParallel(),
            "attention": PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            "feed_forward.w3": ColwiseParallel(),
        })


def _present(model: Transformer, name: str) -> bool:
    try:
        return model.get_submodule(name) is not None
    except AttributeError:
        return False


def apply_fsdp(model: Transformer, dp_mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy) -> None:
    """``fully_shard`` each block, then the root (embeddings, final norm, output).

    A 2-D ``dp_mesh`` (replicate, shard) gives HSDP. The last block stays gathered after forward,
    since backward needs it first.
    """
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        fully_shard(block, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=True)


def mixed_precision(param_dtype: str, reduce_dtype: str, device: torch.device) -> MixedPrecisionPolicy:
    """FSDP compute/communication dtypes; CPU keeps float32 (bf16 matmuls there are slow and inexact)."""
    if device.type != "cuda":
        return MixedPrecisionPolicy()
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    return MixedPrecisionPolicy(param_dtype=dtypes[param_dtype], reduce_dtype=dtypes[reduce_dtype])


__all__ = ["BlockOptions", "apply_compile", "apply_fsdp", "apply_tp", "column_sharded", "mixed_precision",
           "parallelize_llama"]
