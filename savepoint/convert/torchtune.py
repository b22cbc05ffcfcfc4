"""torchtune interop: a savepoint DCP step folder as a torchtune ``llama3`` / ``llama3_1`` state dict.

What it takes (checked against torchtune 0.6.1, ``torchtune/models/convert_weights.py`` and
``torchtune/modules/position_embeddings.py``; see tests/test_torchtune.py):

* **Keys only.** savepoint's keys are Meta's Llama keys, and torchtune's ``_FROM_META`` table renames
  them exactly as ``SAVEPOINT_TO_TORCHTUNE`` below (norm weights become ``.scale``).
* **No q/k permutation.** torchtune's ``RotaryPositionalEmbeddings`` and ``Llama3ScaledRoPE`` rotate
  interleaved pairs ``(x[2i], x[2i+1])``, as savepoint (and Meta) do; only HF checkpoints, whose RoPE
  pairs ``(x[i], x[i+d/2])``, need one (torchtune's ``hf_to_tune`` applies it, ``meta_to_tune`` does not).
* **The MLP width must be passed.** torchtune's builders derive it as ``4 * int(2 * dim / 3)`` rounded
  up to 256, savepoint as ``int(8 * dim / 3)`` (times ``ffn_dim_multiplier``) rounded up to
  ``multiple_of``; they differ for many sizes, so ``torchtune_builder`` always sets ``intermediate_dim``.
* **RoPE scaling:** ``llama3_1`` exposes only ``scale_factor``; the low/high frequency factors and the
  original context length are fixed at Llama 3.1's 1, 4 and 8192. ``use_scaled_rope=False`` maps to
  ``llama3``.

torchtune is not a dependency: only ``build_torchtune_model`` imports it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from savepoint.checkpoint.compat import saved_model_keys
from savepoint.checkpoint.coordination import as_savepoint_error
from savepoint.checkpoint.fit import check_model_fits
from savepoint.checkpoint.reader import VerifyingReader
from savepoint.checkpoint.safe_load import SafeLoadPlanner
from savepoint.checkpoint.storage import holds, location
from savepoint.config.problems import url_problem
from savepoint.dtypes import FLOAT_DTYPES, torch_dtype
from savepoint.durable import DCP_MARKER, fsync_file, publish
from savepoint.errors import CheckpointError, ConfigError, SavepointError
from savepoint.hf.llama3 import map_key, savepoint_shapes
from savepoint.models.llama3.args import ModelArgs

# savepoint key -> torchtune key; ``{}`` stands for the layer index.
SAVEPOINT_TO_TORCHTUNE = {
    "tok_embeddings.weight": "tok_embeddings.weight",
    "layers.{}.attention.wq.weight": "layers.{}.attn.q_proj.weight",
    "layers.{}.attention.wk.weight": "layers.{}.attn.k_proj.weight",
    "layers.{}.attention.wv.weight": "layers.{}.attn.v_proj.weight",
    "layers.{}.attention.wo.weight": "layers.{}.attn.output_proj.weight",
    "layers.{}.feed_forward.w1.weight": "layers.{}.mlp.w1.weight",
    "layers.{}.feed_forward.w2.weight": "layers.{}.mlp.w2.weight",
    "layers.{}.feed_forward.w3.weight": "layers.{}.mlp.w3.weight",
    "layers.{}.attention_norm.weight": "layers.{}.sa_norm.scale",
    "layers.{}.ffn_norm.weight": "layers.{}.mlp_norm.scale",
    "norm.weight": "norm.scale",
    "output.weight": "output.weight",
}
TORCHTUNE_TO_SAVEPOINT = {tune: ours for ours, tune in SAVEPOINT_TO_TORCHTUNE.items()}
# Llama 3.1 RoPE scaling constants that torchtune's llama3_1 builder does not expose.
TORCHTUNE_FIXED_ROPE = {"rope_low_freq_factor": 1.0, "rope_high_freq_factor": 4.0, "rope_original_max_pos": 8192}


def to_torchtune_key(key: str) -> str:
    """``layers.0.attention.wq.weight`` -> ``layers.0.attn.q_proj.weight``."""
    return map_key(key, SAVEPOINT_TO_TORCHTUNE, "savepoint -> torchtune")


def from_torchtune_key(key: str) -> str:
    """``layers.0.attn.q_proj.weight`` -> ``layers.0.attention.wq.weight``."""
    return map_key(key, TORCHTUNE_TO_SAVEPOINT, "torchtune -> savepoint")


def to_torchtune(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A savepoint model state dict under torchtune's keys (same tensors: nothing is permuted or copied)."""
    return {to_torchtune_key(k): v for k, v in state_dict.items()}


def from_torchtune(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A torchtune Llama 3 state dict under savepoint's keys (same tensors)."""
    return {from_torchtune_key(k): v for k, v in state_dict.items()}


def read_model_state(step_dir: str | Path, args: ModelArgs) -> dict[str, torch.Tensor]:
    """The model tensors of a DCP step folder, under savepoint's keys, in their saved dtypes.

    Works on model-only and full checkpoints (only model keys are read), on checkpoints written by any
    number of ranks, and on TorchTitan 0.3's key layout. One process, no process group.

    Raises:
        CheckpointError: the folder is not a DCP checkpoint, or lacks a tensor of ``args``' model, or
            holds it with another shape.
    """
    step_dir = location(step_dir)  # an s3:// step is read in place, by ranged GETs
    if not holds(step_dir, DCP_MARKER):
        raise CheckpointError(f"{step_dir} is not a DCP checkpoint folder (no {DCP_MARKER}); point it at a step-N "
                              "folder")
    reader = VerifyingReader.for_step(step_dir)
    saved = reader.read_metadata().state_dict_metadata
    shapes = savepoint_shapes(args)
    names = saved_model_keys(shapes, saved)
    check_model_fits(saved, shapes, str(step_dir), flag="--model_flavor", names=names)
    state = {ours: torch.empty(shape, dtype=saved[names[ours]].properties.dtype) for ours, shape in shapes.items()}
    reader.check_sizes()
    try:
        dcp.load({names[k]: t for k, t in state.items()}, storage_reader=reader, planner=SafeLoadPlanner(),
                 no_dist=True)
    except (Exception, CheckpointException) as e:  # DCP wraps a failed read (one line per cause here)
        raise as_savepoint_error(e, f"reading the model tensors of {step_dir}") from e
    return state


def to_torchtune_state_dict(step_dir: str | Path, args: ModelArgs,
                            dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Read a savepoint step folder (model-only or full) and return the state dict of torchtune's model.

    The result loads with ``strict=True`` into ``build_torchtune_model(args)``; tensors keep their saved
    dtype unless ``dtype`` is given (``load_state_dict`` casts into the model's dtype anyway).

    Raises:
        CheckpointError: see ``read_model_state``.
    """
    state = read_model_state(step_dir, args)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    return to_torchtune(state)


def torchtune_builder(args: ModelArgs, max_seq_len: int | None = None) -> tuple[str, dict[str, Any]]:
    """The torchtune builder (``"llama3"`` or ``"llama3_1"``, in ``torchtune.models``) and its kwargs for ``args``.

    Raises:
        SavepointError: ``args`` uses RoPE scaling constants torchtune's ``llama3_1`` cannot express.
    """
    kwargs: dict[str, Any] = {
        "vocab_size": args.vocab_size,
        "num_layers": args.n_layers,
        "num_heads": args.n_heads,
        "num_kv_heads": args.num_kv_heads,
        "embed_dim": args.dim,
        "max_seq_len": max_seq_len or args.max_seq_len,
        "rope_base": args.rope_theta,
        "intermediate_dim": args.ffn_hidden_dim,  # torchtune's own formula differs from ours
        "norm_eps": args.norm_eps,
    }
    if not args.use_scaled_rope:
        return "llama3", kwargs
    fixed = {name: value for name, value in TORCHTUNE_FIXED_ROPE.items() if getattr(args, name) != value}
    if fixed:
        wanted = ", ".join(f"{n}={getattr(args, n)}" for n in fixed)
        raise SavepointError(f"torchtune's llama3_1 fixes the Llama 3.1 RoPE constants {TORCHTUNE_FIXED_ROPE}; "
                             f"this model uses {wanted}")
    return "llama3_1", {**kwargs, "scale_factor": args.rope_scaling_factor}


def build_torchtune_model(args: ModelArgs, max_seq_len: int | None = None) -> torch.nn.Module:
    """torchtune's ``TransformerDecoder`` for ``args`` (needs torchtune installed; randomly initialised)."""
    import torchtune.models.llama3
    import torchtune.models.llama3_1

    name, kwargs = torchtune_builder(args, max_seq_len)
    module = torchtune.models.llama3_1 if name == "llama3_1" else torchtune.models.llama3
    return getattr(module, name)(**kwargs)


def convert_to_torchtune(step_dir: str | Path, out_file: str | Path, args: ModelArgs,
                         dtype: torch.dtype | None = None) -> Path:
    """Write a step folder's weights as a torchtune ``.pt`` (torchtune keys), ready for ``load_state_dict``.

    The file is written under a hidden temporary name and renamed, so it appears complete or not at
    all; an existing file is never overwritten.

    Raises:
        CheckpointError: ``out_file`` exists, or see ``read_model_state``.
    """
    out = Path(out_file)
    if os.path.lexists(out):
        raise CheckpointError(_exists(out))
    state = to_torchtune_state_dict(step_dir, args, dtype)
    partial = out.with_name(f".{out.name}.partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.save(state, partial)
        fsync_file(partial)
        publish(partial, out)  # never replaces a file that appeared at ``out`` meanwhile
    except FileExistsError:
        raise CheckpointError(_exists(out)) from None
    finally:
        if os.path.lexists(partial):
            os.unlink(partial)
    return out


def _exists(out: Path) -> str:
    return f"{out} already exists; choose a new output path (it is never overwritten)"


def main(argv: list[str]) -> None:
    """``savepoint convert to_torchtune STEP_DIR OUT.pt --model_flavor F [--dtype D]``."""
    import argparse

    from savepoint.models.llama3.args import LLAMA3_FLAVORS

    parser = argparse.ArgumentParser(prog="savepoint convert to_torchtune",
                                     description="Write a checkpoint step's weights as a torchtune .pt file.")
    parser.add_argument("step_dir", help="a step-N folder (model-only or full)")
    parser.add_argument("out_file", help="the .pt file to write (must not exist)")
    parser.add_argument("--model_name", default="llama3", choices=["llama3"])
    parser.add_argument("--model_flavor", required=True, choices=sorted(LLAMA3_FLAVORS))
    parser.add_argument("--dtype", choices=FLOAT_DTYPES,
                        help="cast the weights (default: as saved)")
    ns = parser.parse_args(argv)
    problems = [*url_problem("to_torchtune: input", ns.step_dir, " ", s3=True),
                *url_problem("to_torchtune: output", ns.out_file, " ")]
    if problems:
        raise ConfigError(problems)
    args = LLAMA3_FLAVORS[ns.model_flavor]
    out = convert_to_torchtune(ns.step_dir, ns.out_file, args, torch_dtype(ns.dtype) if ns.dtype else None)
    name, kwargs = torchtune_builder(args)
    print(f"wrote {out}; in torchtune: model = torchtune.models.{name}.{name}(**{kwargs}); "
          f"model.load_state_dict(torch.load({str(out)!r}))")


__all__ = ["SAVEPOINT_TO_TORCHTUNE", "TORCHTUNE_TO_SAVEPOINT", "build_torchtune_model", "convert_to_torchtune",
           "from_torchtune", "from_torchtune_key", "read_model_state", "to_torchtune", "to_torchtune_key",
           "to_torchtune_state_dict", "torchtune_builder"]
