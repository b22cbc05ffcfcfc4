"""Llama 3 model arguments and the named flavors (sizes) users pick with --model.flavor."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: same as n_heads (no GQA)
    vocab_size: int = 128256
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    # Llama 3.1 RoPE frequency scaling ("llama3" rope_type in HF configs).
    use_scaled_rope: bool = True
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_pos: int = 8192
    max_seq_len: int = 131072
    depth_init: bool = True  # scale output-projection init by layer depth

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def num_kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU hidden size, computed the way Meta's Llama code does."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def with_max_seq_len(self, seq_len: int) -> ModelArgs:
        return replace(self, max_seq_len=seq_len)


# TorchTitan's debugmodel vocabulary: its test tokenizer (and savepoint's, tests/assets/tokenizer:
# 2000 ids) and the byte tokenizer (258 ids) both fit, and TorchTitan debugmodel checkpoints load.
DEBUG_VOCAB_SIZE = 2048

LLAMA3_FLAVORS: dict[str, ModelArgs] = {
    # Tiny, for CPU tests: a training step takes a fraction of a second on 2 cores.
    "debugmodel": ModelArgs(
        dim=256, n_layers=6, n_heads=16, n_kv_heads=8, vocab_size=DEBUG_VOCAB_SIZE, max_seq_len=2048
    ),
    "8B": ModelArgs(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=1024
    ),
    "70B": ModelArgs(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096
    ),
    "405B": ModelArgs(
        dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim_multiplier=1.2, multiple_of=4096
    ),
}
