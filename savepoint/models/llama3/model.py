"""The Llama 3 transformer: RMSNorm, RoPE with Llama 3.1 frequency scaling, GQA attention, SwiGLU.

Parameter names match TorchTitan v0.2.x (``layers.{i}.attention.wq.weight``, ``output.weight``, ...),
because checkpoint keys are the model's state_dict keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from savepoint.distributed import copy_full_into
from savepoint.models.llama3.args import ModelArgs


def precompute_freqs_cis(args: ModelArgs, seq_len: int, device: torch.device | None = None) -> torch.Tensor:
    """Complex rotations e^(i * pos * freq) for each position and frequency: [seq_len, head_dim // 2]."""
    dim = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, device=device)[: dim // 2].float() / dim))
    if args.use_scaled_rope:
        freqs = _apply_llama3_scaling(freqs, args)
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(positions, freqs)  # [seq_len, head_dim // 2]
    return torch.polar(torch.ones_like(angles), angles)


def _apply_llama3_scaling(freqs: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths are slowed by the factor, short ones kept, the middle blended."""
    low_freq_wavelen = args.rope_original_max_pos / args.rope_low_freq_factor
    high_freq_wavelen = args.rope_original_max_pos / args.rope_high_freq_factor
    wavelen = 2 * math.pi / freqs
    smooth = (args.rope_original_max_pos / wavelen - args.rope_low_freq_factor) / (
        args.rope_high_freq_factor - args.rope_low_freq_factor
    )
    blended = (1 - smooth) * freqs / args.rope_scaling_factor + smooth * freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / args.rope_scaling_factor, freqs)
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of q and k: [bs, seqlen, heads, head_dim] each."""
    xq_c = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_c = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    rot = freqs_cis[: xq.shape[1]].view(1, xq.shape[1], 1, xq_c.shape[-1])
    xq_out = torch.view_as_real(xq_c * rot).flatten(3)
    xk_out = torch.view_as_real(xk_c * rot).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.num_kv_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)

    def init_weights(self, init_std: float) -> None:
        for linear in (self.wq, self.wk, self.wv):
            nn.init.trunc_normal_(linear.weight, mean=0.0, std=0.02)
        nn.init.trunc_normal_(self.wo.weight, mean=0.0, std=init_std)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        bs, seqlen, _ = x.shape
        # Local head counts come from the weight shapes, so a tensor-parallel shard works unchanged.
        xq = self.wq(x).view(bs, seqlen, -1, self.head_dim)  # [bs, seqlen, n_heads, head_dim]
        xk = self.wk(x).view(bs, seqlen, -1, self.head_dim)  # [bs, seqlen, n_kv_heads, head_dim]
        xv = self.wv(x).view(bs, seqlen, -1, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)
        q, k, v = (t.transpose(1, 2) for t in (xq, xk, xv))  # [bs, heads, seqlen, head_dim]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out = out.transpose(1, 2).reshape(bs, seqlen, -1)  # [bs, seqlen, n_heads * head_dim]
        return self.wo(out)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def init_weights(self, init_std: float) -> None:
        nn.init.trunc_normal_(self.w1.weight, mean=0.0, std=0.02)
        for linear in (self.w2, self.w3):
            nn.init.trunc_normal_(linear.weight, mean=0.0, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        depth = layer_id + 1 if args.depth_init else args.n_layers
        self.init_std = 0.02 / (2 * depth) ** 0.5

    def init_weights(self) -> None:
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.attention.init_weights(self.init_std)
        self.feed_forward.init_weights(self.init_std)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Llama 3. ``forward(tokens [bs, seqlen]) -> logits [bs, seqlen, vocab_size]``."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        # A ModuleDict keyed "0", "1", ... keeps FQNs stable when pipeline stages drop layers.
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, args) for i in range(args.n_layers)})
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # Derived from args, so it is never saved: checkpoints stay loadable if max_seq_len changes.
        self.register_buffer("freqs_cis", precompute_freqs_cis(args, args.max_seq_len), persistent=False)

    def init_parts(self) -> list[tuple[str, Callable[[nn.Module], None]]]:
        """Submodules and their init functions, in the order they draw random numbers.

        Init is a fixed sequence of draws from one generator; ``initialize`` replays it part by
        part on full-size CPU copies, which makes the weights independent of how they are sharded.
        """
        final_std = self.args.dim**-0.5

        def init_output(output: nn.Module) -> None:
            nn.init.trunc_normal_(output.weight, mean=0.0, std=final_std, a=-3 * final_std, b=3 * final_std)

        return [
            ("tok_embeddings", lambda emb: nn.init.normal_(emb.weight)),
            *[(f"layers.{i}", TransformerBlock.init_weights) for i in self.layers],
            ("norm", nn.RMSNorm.reset_parameters),
            ("output", init_output),
        ]

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        """(Re)initialise every parameter and buffer in place (unsharded models; see ``initialize``)."""
        device = buffer_device or self.freqs_cis.device
        self.freqs_cis = precompute_freqs_cis(self.args, self.args.max_seq_len, device=device)
        for name, init in self.init_parts():
            init(self.get_submodule(name))

    def init_buffers(self, device: torch.device | str) -> None:
        """Recompute the RoPE table (a non-persistent buffer, left uninitialised by ``to_empty``)."""
        self.freqs_cis = precompute_freqs_cis(self.args, self.args.max_seq_len, device=torch.device(device))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens to logits; a pipeline stage that lacks the embedding, norm or output passes hidden states."""
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens  # [bs, seqlen, dim]
        for layer in self.layers.values():
            h = layer(h, self.freqs_cis)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h  # [bs, seqlen, vocab_size]


@torch.no_grad()
def initialize(model: nn.Module, seed: int, device: torch.device | str, args: ModelArgs | None = None) -> None:
    """Give a materialised (``to_empty``) model the weights a one-process CPU init with ``seed`` gives.

    Each part is initialised full-size on the CPU from one seeded generator, then copied into the
    model, whose parameters may be plain tensors or DTensor shards (FSDP, TP, HSDP). The weights are
    therefore bit-identical at every layout and on every device, and the extra memory is one part
    (a transformer block or the embedding), never the whole model.

    ``model`` may hold only some parts under their global names (a pipeline stage, or the union
    of a rank's stages): every part is still drawn, in order, so the ones it holds get the same
    numbers; the others are skipped. Pass ``args`` when ``model`` is not a ``Transformer``.
    """
    device = torch.device(device)
    args = args or model.args
    for module in model.modules():
        if isinstance(module, Transformer):
            module.init_buffers(device)
    with torch.device("meta"):
        template = Transformer(args)
    torch.manual_seed(seed)
    for name, init in template.init_parts():
        part = template.get_submodule(name).to_empty(device="cpu")
        init(part)
        if _holds(model, name):
            for key, full in part.state_dict().items():
                copy_full_into(model.get_parameter(f"{name}.{key}"), full)
        part.to_empty(device="meta")


def _holds(model: nn.Module, name: str) -> bool:
    """Whether ``model`` has the submodule ``name`` (a pipeline stage drops the ones other stages hold)."""
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def build_model(args: ModelArgs, seed: int, device: torch.device | str = "cpu",
                parallelize: Callable[[Transformer], None] | None = None) -> Transformer:
    """Build on the meta device, apply ``parallelize`` (FSDP/TP), materialise on ``device``, initialise.

    The weights depend only on ``args`` and ``seed``, not on the layout or the device (see ``initialize``).
    """
    with torch.device("meta"):
        model = Transformer(args)
    if parallelize is not None:
        parallelize(model)
    model.to_empty(device=device)
    initialize(model, seed, device)
    return model
