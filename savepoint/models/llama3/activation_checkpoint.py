"""Activation checkpointing of transformer blocks: recompute activations in backward instead of keeping them.

Modes (TorchTitan's names):

- ``none``: keep every activation.
- ``full``: every block keeps only its input; backward reruns the block's forward.
- ``selective`` with an integer N: blocks ``N-1, 2N-1, ...`` (every N-th, counting from 1) are checkpointed
  in full, the others keep everything.
- ``selective`` with ``op``: every block keeps the outputs of its matrix multiplications and attention and
  recomputes the cheap element-wise rest (norms, RoPE, SiLU, products).

The block itself is not wrapped: its ``forward`` is replaced, on the instance, by one that runs the
class's forward under ``torch.utils.checkpoint``. No module is added, so parameter names (and hence
checkpoint keys, ``layers.0.attention.wq.weight``) are exactly those of the model without checkpointing,
and a checkpoint saved with one mode loads with any other. Apply it before FSDP (which then gathers
the block's weights again for the recomputation, in backward, as it does for the backward itself).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

MODES = ("none", "full", "selective")

# Ops whose outputs per-op selective checkpointing keeps: the matmuls and the attention kernels
# (expensive to recompute); everything else in a block is recomputed.
_aten = torch.ops.aten
SAVED_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten.baddbmm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
}
# Collectives (tensor parallelism) are never rerun in backward: that would communicate twice.
_SAVED_COLLECTIVES = {
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
    torch.ops._c10d_functional.all_gather_into_tensor.default,
    torch.ops._c10d_functional.all_reduce.default,
    torch.ops._c10d_functional.wait_tensor.default,
}


def check_ac_options(mode: str, selective_option: str) -> str | None:
    """The problem with ``mode`` / ``selective_option``, in words, or None when they are valid."""
    if mode == "memory_budget":
        return "activation_checkpoint.mode 'memory_budget' is not supported yet; use none, full or selective"
    if mode not in MODES:
        return f"activation_checkpoint.mode is {mode!r}; use one of {', '.join(MODES)}"
    if mode == "selective" and selective_option != "op":
        if not selective_option.isdigit() or int(selective_option) < 1:
            return (f"activation_checkpoint.selective_ac_option is {selective_option!r}; use 'op' or a positive "
                    "integer N (checkpoint every N-th block)")
    return None


def _op_policy(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    if func in SAVED_OPS or func in _SAVED_COLLECTIVES:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _op_contexts() -> tuple[Any, Any]:
    return create_selective_checkpoint_contexts(_op_policy)


def _checkpoint_forward(block: nn.Module, context_fn: Callable[[], tuple[Any, Any]] | None) -> None:
    """Make ``block``'s calls run its class's forward under non-reentrant checkpointing."""
    inner = functools.partial(type(block).forward, block)
    extra = {"context_fn": context_fn} if context_fn is not None else {}

    def forward(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(inner, *args, use_reentrant=False, preserve_rng_state=True, **extra, **kwargs)

    block.forward = forward  # an instance attribute: no new submodule, no new parameter name


def checkpointed_blocks(layer_ids: list[str], mode: str, selective_option: str) -> dict[str, str]:
    """Which of ``layer_ids`` get checkpointed, and how ('full' or 'op'); the global layer id decides,
    so every pipeline split checkpoints the same blocks."""
    if mode == "none":
        return {}
    if mode == "full":
        return {i: "full" for i in layer_ids}
    if selective_option == "op":
        return {i: "op" for i in layer_ids}
    every = int(selective_option)
    return {i: "full" for i in layer_ids if (int(i) + 1) % every == 0}


def apply_ac(model: nn.Module, mode: str, selective_option: str = "2") -> dict[str, str]:
    """Checkpoint the blocks of ``model.layers`` (a whole model or a pipeline stage) in place, as
    ``mode`` says; returns ``{layer id: 'full' | 'op'}`` for the blocks it changed.

    Raises:
        ValueError: ``mode`` or ``selective_option`` is not valid (see ``check_ac_options``).
    """
    problem = check_ac_options(mode, selective_option)
    if problem:
        raise ValueError(problem)
    layers = getattr(model, "layers", None)
    if layers is None:
        return {}
    chosen = checkpointed_blocks(list(layers.keys()), mode, selective_option)
    for layer_id, kind in chosen.items():
        _checkpoint_forward(layers[layer_id], _op_contexts if kind == "op" else None)
    return chosen


__all__ = ["MODES", "SAVED_OPS", "apply_ac", "check_ac_options", "checkpointed_blocks"]
