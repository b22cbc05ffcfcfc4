"""The Llama 3 state-dict adapter: HF ``LlamaForCausalLM`` keys and layout <-> savepoint's (TorchTitan v0.2.x).

One declarative table maps keys; ``{}`` stands for the layer index. The only tensors that change
on the way are ``wq`` and ``wk``: savepoint (like Meta's and TorchTitan's code) rotates
interleaved pairs ``(x[2i], x[2i+1])`` in RoPE, while HF's ``rotate_half`` pairs ``(x[i], x[i+d/2])``,
so their rows are permuted within each head (q with ``n_heads`` heads, k with ``n_kv_heads``).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Collection
from typing import Any

import torch

from savepoint.errors import CheckpointError
from savepoint.hf.folder import HFFolder
from savepoint.models.llama3.args import ModelArgs

logger = logging.getLogger(__name__)

# HF key -> savepoint key.
HF_TO_SAVEPOINT = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
SAVEPOINT_TO_HF = {ours: hf for hf, ours in HF_TO_SAVEPOINT.items()}
# HF tensors that carry no weights (recomputed from the config): skipped, never an error.
HF_DERIVED = ("model.layers.{}.self_attn.rotary_emb.inv_freq",)
EMBEDDING, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"
_LAYER = re.compile(r"\.(\d+)\.")


def layer_template(key: str) -> tuple[str, str | None]:
    """``layers.3.attention.wq.weight`` -> (``layers.{}.attention.wq.weight``, ``3``)."""
    match = _LAYER.search(key)
    if match is None:
        return key, None
    return key[: match.start()] + ".{}." + key[match.end() :], match.group(1)


def map_key(key: str, table: dict[str, str], direction: str) -> str:
    """``key`` renamed by a ``{}``-templated table; an unmapped key is an error naming it."""
    template, layer = layer_template(key)
    if template not in table:
        raise CheckpointError(f"{direction}: no mapping for tensor {key!r}; it is not part of a Llama 3 model")
    return table[template].replace("{}", layer) if layer is not None else table[template]


def to_hf_key(key: str) -> str:
    return map_key(key, SAVEPOINT_TO_HF, "savepoint -> Hugging Face")


def from_hf_key(key: str) -> str | None:
    """The savepoint key of an HF key; None for tensors HF derives from the config (``inv_freq``)."""
    if layer_template(key)[0] in HF_DERIVED:
        return None
    return map_key(key, HF_TO_SAVEPOINT, "Hugging Face -> savepoint")


def _heads(key: str, args: ModelArgs) -> int | None:
    """Heads to permute within, for q and k weights (savepoint keys); None for every other tensor."""
    if key.endswith("attention.wq.weight"):
        return args.n_heads
    if key.endswith("attention.wk.weight"):
        return args.num_kv_heads
    return None


def _permute_to_hf(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from interleaved-pair order (0,1,2,3,...) to half-split order (0,2,4,...,1,3,5,...)."""
    rows, cols = w.shape
    return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _permute_from_hf(w: torch.Tensor, heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def to_hf_tensor(key: str, tensor: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """The HF tensor for savepoint ``key`` (a new tensor for q/k, ``tensor`` itself otherwise)."""
    heads = _heads(key, args)
    return _permute_to_hf(tensor, heads) if heads else tensor


def from_hf_tensor(key: str, tensor: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """The savepoint tensor for savepoint ``key`` given its HF tensor."""
    heads = _heads(key, args)
    return _permute_from_hf(tensor, heads) if heads else tensor


def savepoint_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every savepoint model key and its shape, from a meta-device model (no memory)."""
    from savepoint.models.llama3.model import Transformer

    with torch.device("meta"):
        model = Transformer(args)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def max_positions(args: ModelArgs) -> int:
    """``max_position_embeddings`` for ``args``: the context its llama3 RoPE scaling stretches to.

    transformers warns when ``original_max_position_embeddings`` is not below it (the debug
    flavor's 2048 against Llama 3.1's 8192), and the llama3 RoPE frequencies do not depend on it,
    so raising it to ``original * factor`` changes no logit (Llama 3.1 8B: 131072 either way).
    """
    if not args.use_scaled_rope:
        return args.max_seq_len
    return max(args.max_seq_len, int(args.rope_original_max_pos * args.rope_scaling_factor),
               args.rope_original_max_pos + 1)


def hf_config(args: ModelArgs, dtype: torch.dtype, bos_token_id: int | None = None,
              eos_token_id: int | None = None) -> dict[str, Any]:
    """A ``config.json`` for ``LlamaForCausalLM`` describing ``args``."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.num_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": args.rope_scaling_factor,
            "low_freq_factor": args.rope_low_freq_factor,
            "high_freq_factor": args.rope_high_freq_factor,
            "original_max_position_embeddings": args.rope_original_max_pos,
        } if args.use_scaled_rope else None,
        "max_position_embeddings": max_positions(args),
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


class Llama3HFAdapter:
    """Everything the checkpointer and the converters need to move one Llama 3 flavor to and from HF."""

    def __init__(self, args: ModelArgs, flavor: str = "custom"):
        self.args = args
        self.flavor = flavor
        self.shapes = savepoint_shapes(args)

    def to_hf(self, key: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
        return to_hf_key(key), to_hf_tensor(key, tensor, self.args)

    def from_hf(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """The savepoint tensor for savepoint ``key`` from its HF tensor."""
        return from_hf_tensor(key, tensor, self.args)

    def config(self, dtype: torch.dtype, bos_token_id: Any = None, eos_token_id: Any = None) -> dict[str, Any]:
        return hf_config(self.args, dtype, bos_token_id=bos_token_id, eos_token_id=eos_token_id)

    def plan_load(self, folder: HFFolder, where: str) -> dict[str, str]:
        """Check an HF folder against the flavor before any weight is read; returns ``hf_sources``.

        The one check both ``convert_from_hf`` and ``--checkpoint.initial_load_in_hf`` run: keys,
        shapes, floating dtypes, and ``config.json`` (head counts, which decide the q/k permutation,
        and the types of its values).

        Raises:
            CheckpointError: naming the first bad tensor or config value.
        """
        config = folder.config()
        tied = _typed(config, "tie_word_embeddings", bool, where) or False
        sources = self.hf_sources(folder.keys(), where, tied=tied)
        self.check_shapes({key: folder.shape(key) for key in folder.keys()}, sources, where)
        for ours, hf in sources.items():
            dtype = folder.dtype(hf)
            if not dtype.is_floating_point:
                raise CheckpointError(f"{where}: tensor {hf!r} is stored as {dtype} but {ours!r} holds weights, "
                                      "which are floating point; the folder is damaged or not a Llama 3 model")
        check_hf_config(config, self.args, self.flavor, where)
        return sources

    def read_checked(self, folder: HFFolder, hf: str) -> torch.Tensor:
        """The HF tensor ``hf`` read from ``folder``, refused if any value is NaN or inf.

        Raises:
            CheckpointError: the tensor holds non-finite values (naming it and its file).
        """
        tensor = folder.read(hf)
        bad = count_non_finite(tensor)
        if bad:
            raise CheckpointError(
                f"{folder.entries[hf][0]}: tensor {hf!r} holds {bad:,} non-finite values (NaN or inf) of "
                f"{tensor.numel():,}; training from it would only produce nan. Re-download or re-export the folder")
        return tensor

    def hf_sources(self, hf_keys: Collection[str], where: str, tied: bool = False) -> dict[str, str]:
        """For each savepoint key, the HF key holding it; checks the folder's keys and shapes first.

        ``tied``: the folder's config ties the output to the embedding, so a missing ``lm_head``
        is read from ``model.embed_tokens``.

        Raises:
            CheckpointError: naming the first tensor missing, the first one that maps to nothing,
                or the first whose shape does not fit the flavor.
        """
        available = set(hf_keys)
        for key in sorted(available):
            if from_hf_key(key) is None:
                continue  # derived from the config (inv_freq)
            if from_hf_key(key) not in self.shapes:
                raise CheckpointError(f"{where}: tensor {key!r} has no place in a Llama 3 {self.flavor} model "
                                      f"({self.args.n_layers} layers); check --model.flavor")
        sources = {}
        for ours in self.shapes:
            hf = to_hf_key(ours)
            if hf not in available and hf == LM_HEAD and tied and EMBEDDING in available:
                hf = EMBEDDING  # tied word embeddings: the output layer is the embedding
            if hf not in available:
                raise CheckpointError(f"{where}: tensor {hf!r} (savepoint {ours!r}) is missing; the folder is "
                                      f"incomplete or not a Llama 3 {self.flavor} model")
            sources[ours] = hf
        return sources

    def check_shapes(self, shape_of: dict[str, tuple[int, ...]], sources: dict[str, str], where: str) -> None:
        for ours, hf in sources.items():
            if tuple(shape_of[hf]) != self.shapes[ours]:
                raise CheckpointError(
                    f"{where}: tensor {hf!r} has shape {list(shape_of[hf])} but the Llama 3 {self.flavor} model needs "
                    f"{list(self.shapes[ours])} for {ours!r}; check --model.flavor"
                )


def count_non_finite(tensor: torch.Tensor, chunk: int = 1 << 24) -> int:
    """How many NaN/inf values a floating tensor holds (0 for others), in chunks to bound memory."""
    if not tensor.is_floating_point():
        return 0
    flat = tensor.reshape(-1)
    bad = 0
    for start in range(0, flat.numel(), chunk):
        piece = flat[start:start + chunk]
        if piece.element_size() == 1:  # float8: isfinite has no kernel for it
            piece = piece.to(torch.float16)
        bad += int(piece.numel() - torch.isfinite(piece).sum())
    return bad


# ---- config.json ----------------------------------------------------------------------------------


def _typed(config: dict[str, Any], key: str, kind: type, where: str) -> Any:
    """``config[key]`` if absent/None or of ``kind`` (``float`` takes ints; bools are never numbers).

    Raises:
        CheckpointError: the value has another type, or is a non-finite or non-positive number.
    """
    value = config.get(key)
    if value is None:
        return None
    numeric = kind in (int, float)
    ok = isinstance(value, (int, float) if kind is float else kind) and not (numeric and isinstance(value, bool))
    if ok and numeric:
        ok = math.isfinite(value) and value > 0
    if not ok:
        want = {int: "a positive integer", float: "a positive number", bool: "true or false", dict: "an object",
                str: "a string"}[kind]
        raise CheckpointError(f"{where}/config.json has {key}={json_repr(value)} ({type(value).__name__}); "
                              f"it must be {want}. Fix config.json or re-download the folder")
    return value


def json_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _rope(config: dict[str, Any], where: str) -> dict[str, Any]:
    """RoPE settings from an HF config, old (``rope_theta`` + ``rope_scaling``) or new (``rope_parameters``)."""
    params = dict(_typed(config, "rope_scaling", dict, where) or {})
    params.update(_typed(config, "rope_parameters", dict, where) or {})
    if "rope_theta" in config:
        params.setdefault("rope_theta", config["rope_theta"])
    for key in ("rope_theta", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        _typed(params, key, float, where)
    for key in ("rope_type", "type"):
        _typed(params, key, str, where)
    return params


def check_hf_config(config: dict[str, Any], args: ModelArgs, flavor: str, where: str) -> None:
    """Compare an HF ``config.json`` with the flavor (the tensor shapes have been checked already).

    Head counts cannot be seen in every shape (``q_proj`` is ``dim x dim`` whatever the head
    count) but the q/k permutation depends on them: a mismatch is an error. RoPE and norm settings
    do not change the weights: a mismatch is a warning (training uses the flavor's values). A
    value of the wrong type (a string for ``rope_theta``) is an error.

    Raises:
        CheckpointError: the config's head counts or head size differ from the flavor's, or a value
            it has is of the wrong type.
    """
    if not config:
        return
    found = {name: _typed(config, name, int, where)
             for name in ("num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size")}
    heads = found["num_attention_heads"]
    if found["num_key_value_heads"] is None:
        found["num_key_value_heads"] = heads  # HF: kv heads default to the query heads
    if found["head_dim"] is None and heads and found["hidden_size"]:
        found["head_dim"] = found["hidden_size"] // heads
    expected = {"num_attention_heads": args.n_heads, "num_key_value_heads": args.num_kv_heads,
                "head_dim": args.head_dim}
    for name, want in expected.items():
        got = found[name]
        if got is not None and got != want:
            raise CheckpointError(f"{where}/config.json has {name}={got} but the Llama 3 {flavor} model has {want}; "
                                  "q/k would be permuted with the wrong head count. Check --model.flavor")
    rope = _rope(config, where)
    ours = {"rope_theta": args.rope_theta, "rms_norm_eps": args.norm_eps}
    theirs = {"rope_theta": rope.get("rope_theta"), "rms_norm_eps": _typed(config, "rms_norm_eps", float, where)}
    if args.use_scaled_rope:
        ours.update(factor=args.rope_scaling_factor, low_freq_factor=args.rope_low_freq_factor,
                    high_freq_factor=args.rope_high_freq_factor,
                    original_max_position_embeddings=args.rope_original_max_pos)
    theirs.update({k: rope.get(k) for k in ours if k not in theirs})
    differ = [f"{k} {theirs[k]} (flavor: {ours[k]})" for k in ours
              if theirs[k] is not None and not math.isclose(float(theirs[k]), float(ours[k]))]
    scaled = rope.get("rope_type", rope.get("type")) == "llama3"
    if rope and scaled != args.use_scaled_rope:
        on_off = {True: "on", False: "off"}
        differ.append(f"llama3 rope scaling {on_off[scaled]} (flavor: {on_off[args.use_scaled_rope]})")
    if differ:
        logger.warning("%s/config.json differs from the Llama 3 %s flavor in %s: the weights convert unchanged, "
                       "but savepoint trains with the flavor's values", where, flavor, "; ".join(differ))
