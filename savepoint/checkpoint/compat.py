"""Checkpoint key layouts of other TorchTitan versions: under which saved key each of our tensors lives.

savepoint's model keys are TorchTitan v0.2.x's (the model's own state_dict keys). TorchTitan 0.3
renamed four of them per model; every other key is unchanged:

=========================================  ====================================================
savepoint / TorchTitan v0.2.x              TorchTitan 0.3
=========================================  ====================================================
``layers.{i}.attention.wq.weight``         ``layers.{i}.attention.qkv_linear.wq.weight``
``layers.{i}.attention.wk.weight``         ``layers.{i}.attention.qkv_linear.wk.weight``
``layers.{i}.attention.wv.weight``         ``layers.{i}.attention.qkv_linear.wv.weight``
``output.weight``                          ``lm_head.weight``
=========================================  ====================================================

The optimizer's flattened keys (``optimizer.state.<fqn>.exp_avg``, ``optimizer.param_groups.<fqn>.lr``,
...) embed the same FQNs and follow the same rename (``to_v03_key``). The layout of a checkpoint is
read off its ``.metadata`` keys (``detect_layout``); nothing here touches tensors except
``save_v03_model_checkpoint``, which writes a 0.3-layout checkpoint for tests.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from pathlib import Path

import torch

from savepoint.hf.llama3 import layer_template

V02 = "v0.2"
V03 = "v0.3"
UNKNOWN = "unknown"

# savepoint (v0.2.x) FQN -> TorchTitan 0.3 FQN; ``{}`` stands for the layer index. Others are unchanged.
V03_RENAMES = {
    "layers.{}.attention.wq.weight": "layers.{}.attention.qkv_linear.wq.weight",
    "layers.{}.attention.wk.weight": "layers.{}.attention.qkv_linear.wk.weight",
    "layers.{}.attention.wv.weight": "layers.{}.attention.qkv_linear.wv.weight",
    "output.weight": "lm_head.weight",
}
FROM_V03 = {v03: ours for ours, v03 in V03_RENAMES.items()}
# Prefixes under which the flattened optimizer state repeats a parameter FQN (with and without the
# top-level "optimizer." that DCP's flattening adds), e.g. optimizer.state.<fqn>.exp_avg.
OPTIMIZER_PREFIXES = ("optimizer.state.", "optimizer.param_groups.", "state.", "param_groups.")


def _rename_fqn(fqn: str, table: Mapping[str, str], allow_suffix: bool) -> str | None:
    """``fqn`` renamed by ``table``, or None if no entry applies.

    With ``allow_suffix``, the table's FQN may be followed by ``.<anything>`` (optimizer entry names).
    """
    template, layer = layer_template(fqn)
    for old, new in table.items():
        if template == old or (allow_suffix and template.startswith(old + ".")):
            renamed = new + template[len(old):]
            return renamed.replace("{}", layer, 1) if layer is not None else renamed
    return None


def _rename_key(key: str, table: Mapping[str, str]) -> str:
    """``key`` renamed by ``table``: a model key, or an optimizer key that embeds one; else unchanged."""
    renamed = _rename_fqn(key, table, allow_suffix=False)
    if renamed is not None:
        return renamed
    for prefix in OPTIMIZER_PREFIXES:
        if key.startswith(prefix):
            renamed = _rename_fqn(key[len(prefix):], table, allow_suffix=True)
            return key if renamed is None else prefix + renamed
    return key


def to_v03_key(key: str) -> str:
    """The TorchTitan 0.3 name of a savepoint checkpoint key; keys 0.3 did not rename come back unchanged.

    Handles model keys (``layers.0.attention.wq.weight``, ``output.weight``) and the optimizer keys that
    embed them, with or without the top-level ``optimizer.`` (``optimizer.state.output.weight.exp_avg``,
    ``param_groups.layers.0.attention.wk.weight.lr``).
    """
    return _rename_key(key, V03_RENAMES)


def from_v03_key(key: str) -> str:
    """Inverse of ``to_v03_key``: the savepoint name of a TorchTitan 0.3 checkpoint key."""
    return _rename_key(key, FROM_V03)


def _has_renamed_model_key(keys: Iterable[str], table: Mapping[str, str]) -> bool:
    """Whether any top-level key is one that ``table`` renames (optimizer keys are not looked at)."""
    return any(_rename_fqn(k, table, allow_suffix=False) is not None for k in keys)


def detect_layout(saved_keys: Collection[str]) -> str:
    """Which key layout a checkpoint's top-level model keys follow: ``V02``, ``V03`` or ``UNKNOWN``.

    ``V03`` needs at least one 0.3-only model key (``layers.{i}.attention.qkv_linear.w[qkv].weight``,
    ``lm_head.weight``) and none of the names 0.3 dropped (``layers.{i}.attention.w[qkv].weight``,
    ``output.weight``); ``V02`` the other way round. A checkpoint with both kinds (mixed) or neither
    (no attention or output tensor at all) is ``UNKNOWN``.

    Args:
        saved_keys: the checkpoint's keys, e.g. ``VerifyingReader.for_step(path).read_metadata().state_dict_metadata``
            (a dict works: only its keys are read).
    """
    ours = _has_renamed_model_key(saved_keys, V03_RENAMES)
    v03 = _has_renamed_model_key(saved_keys, FROM_V03)
    if v03 and not ours:
        return V03
    if ours and not v03:
        return V02
    return UNKNOWN


def saved_model_keys(model_keys: Iterable[str], saved_keys: Collection[str]) -> dict[str, str]:
    """For each of our model keys, the key under which the checkpoint stores that tensor.

    Contract (for ``loading.StepLoader`` and offline readers):

    * The result has exactly one entry per key of ``model_keys``, in the same order: ``{our key: saved key}``.
    * v0.2.x layout (savepoint's own checkpoints, TorchTitan v0.2.x): the identity.
    * TorchTitan 0.3 layout (see ``detect_layout``): the 0.3 name of every key (``to_v03_key``); keys 0.3
      did not rename map to themselves.
    * Mixed or unrecognised layouts: the identity, so that the caller's usual check of every key against
      the metadata (``fit.check_model_fits``) reports the first missing tensor by name.
    * Nothing is checked here: a mapped key may still be missing from ``saved_keys`` or have another
      shape; the caller checks ``saved_keys[mapping[k]]`` as it would ``saved_keys[k]``.

    To load, request each tensor under its saved key; DCP fills the tensors in place, so the caller's
    model state dict holds the values afterwards::

        names = saved_model_keys(model_sd, metadata.state_dict_metadata)
        dcp.load({names[k]: t for k, t in model_sd.items()}, checkpoint_id=path)

    A full 0.3 checkpoint also stores the optimizer under 0.3 FQNs: rename those keys with ``to_v03_key``
    when ``detect_layout(saved_keys) == V03``.

    Args:
        model_keys: our model's state-dict keys (a state dict works: only its keys are read).
        saved_keys: the checkpoint's keys (``.metadata``'s ``state_dict_metadata`` works).
    """
    if detect_layout(saved_keys) == V03:
        return {k: to_v03_key(k) for k in model_keys}
    return {k: k for k in model_keys}


def save_v03_model_checkpoint(state_dict: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Write ``state_dict`` (savepoint keys) as a model-only DCP checkpoint in TorchTitan 0.3 layout.

    One process, no process group; meant for tests and for fixtures of 0.3-layout checkpoints.
    """
    import torch.distributed.checkpoint as dcp

    renamed = {to_v03_key(k): v for k, v in state_dict.items()}
    dcp.save(renamed, checkpoint_id=str(path), no_dist=True)


__all__ = ["FROM_V03", "UNKNOWN", "V02", "V03", "V03_RENAMES", "detect_layout", "from_v03_key",
           "save_v03_model_checkpoint", "saved_model_keys", "to_v03_key"]
