"""The Llama 3 model: real flavor shapes, TorchTitan parameter names, deterministic init, RoPE, GQA."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from savepoint.models.llama3.args import LLAMA3_FLAVORS, ModelArgs
from savepoint.models.llama3.model import Transformer, build_model, precompute_freqs_cis

# Hand count (vocab 128256, untied output, GQA with 8 kv heads of head_dim 128 = 1024 wide):
#   per layer = wq + wo (2*d*d) + wk + wv (2*d*1024) + w1,w2,w3 (3*d*h) + two norms (2*d)
#   total     = n_layers * per_layer + embeddings + output (2*V*d) + final norm (d)
# 8B:   d=4096,  h=14336, 32 layers  -> 32*218_112_000   + 1_050_673_152 + 4096  = 8_030_261_248
# 70B:  d=8192,  h=28672, 80 layers  -> 80*855_654_400   + 2_101_346_304 + 8192  = 70_553_706_496
# 405B: d=16384, h=53248, 126 layers -> 126*3_187_703_808 + 4_202_692_608 + 16384 = 405_853_388_800
REAL_SIZES = {
    "8B": (8_030_261_248, 14336, 4096),
    "70B": (70_553_706_496, 28672, 8192),
    "405B": (405_853_388_800, 53248, 16384),
}


@pytest.fixture(scope="module")
def debug0() -> Transformer:
    """debugmodel built from seed 0 (trunc_normal_ init takes ~1 s on CPU, so build it once)."""
    return build_model(LLAMA3_FLAVORS["debugmodel"], seed=0)


def _meta_model(flavor: str) -> Transformer:
    with torch.device("meta"):
        return Transformer(LLAMA3_FLAVORS[flavor])


@pytest.mark.parametrize("flavor", sorted(REAL_SIZES))
def test_real_flavor_shapes(flavor):
    n_params, hidden, dim = REAL_SIZES[flavor]
    args = LLAMA3_FLAVORS[flavor]
    assert args.vocab_size == 128256
    assert args.ffn_hidden_dim == hidden
    model = _meta_model(flavor)
    assert sum(p.numel() for p in model.parameters()) == n_params
    layer0 = model.layers["0"]
    assert layer0.feed_forward.w1.weight.shape == (hidden, dim)
    assert layer0.feed_forward.w2.weight.shape == (dim, hidden)
    assert layer0.feed_forward.w3.weight.shape == (hidden, dim)
    # GQA: 8 kv heads of head_dim 128
    assert layer0.attention.wk.weight.shape == (8 * 128, dim)
    assert layer0.attention.wv.weight.shape == (8 * 128, dim)
    assert layer0.attention.wq.weight.shape == (dim, dim)
    assert model.output.weight.shape == (128256, dim)
    assert model.output.weight is not model.tok_embeddings.weight  # untied


def test_8b_gqa_wk_shape():
    model = _meta_model("8B")
    assert list(model.layers["0"].attention.wk.weight.shape) == [1024, 4096]
    assert LLAMA3_FLAVORS["8B"].num_kv_heads == 8
    assert LLAMA3_FLAVORS["8B"].head_dim == 128


def test_state_dict_keys_match_torchtitan():
    args = LLAMA3_FLAVORS["debugmodel"]
    with torch.device("meta"):
        model = Transformer(args)
    keys = list(model.state_dict().keys())
    assert "freqs_cis" in dict(model.named_buffers())
    assert not any("freqs_cis" in k for k in keys)

    expected = ["tok_embeddings.weight"]
    for i in range(args.n_layers):
        p = f"layers.{i}."
        expected += [
            p + "attention.wq.weight",
            p + "attention.wk.weight",
            p + "attention.wv.weight",
            p + "attention.wo.weight",
            p + "feed_forward.w1.weight",
            p + "feed_forward.w2.weight",
            p + "feed_forward.w3.weight",
            p + "attention_norm.weight",
            p + "ffn_norm.weight",
        ]
    expected += ["norm.weight", "output.weight"]
    assert sorted(keys) == sorted(expected)
    assert len(keys) == len(expected)


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_init_is_deterministic(debug0):
    args = LLAMA3_FLAVORS["debugmodel"]
    a = debug0.state_dict()
    b = build_model(args, seed=0).state_dict()
    _assert_same(a, b)
    c = build_model(args, seed=1).state_dict()
    differing = [k for k in a if not torch.equal(a[k], c[k])]
    # every randomly-initialised tensor differs; only the norm weights (ones) agree
    assert all(k.endswith("norm.weight") for k in a if k not in differing)
    assert "tok_embeddings.weight" in differing and "output.weight" in differing


def test_meta_to_empty_init_equals_build_model(debug0):
    args = LLAMA3_FLAVORS["debugmodel"]
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights(buffer_device=torch.device("cpu"))
    ref = debug0
    _assert_same(model.state_dict(), ref.state_dict())
    assert torch.equal(model.freqs_cis, ref.freqs_cis)
    assert torch.equal(ref.freqs_cis, precompute_freqs_cis(args, args.max_seq_len))
    assert "freqs_cis" not in model.state_dict()


def _hf_llama3_inv_freq(head_dim, theta, factor=8.0, low=1.0, high=4.0, original=8192):
    """HF transformers' "llama3" rope_type, in float64 Python."""
    inv = [1.0 / theta ** (i / head_dim) for i in range(0, head_dim, 2)]
    low_wavelen = original / low
    high_wavelen = original / high
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return out


def _freqs_of(args: ModelArgs) -> torch.Tensor:
    # position 1 has angle == frequency (all frequencies are in (0, 1])
    cis = precompute_freqs_cis(args, 4)
    assert cis.shape == (4, args.head_dim // 2)
    assert torch.allclose(cis[0], torch.ones_like(cis[0]))
    return cis[1].angle().double()


@pytest.mark.parametrize("head_dim,theta", [(128, 500000.0), (64, 10000.0), (16, 500000.0)])
def test_llama3_rope_scaling_matches_hf(head_dim, theta):
    args = ModelArgs(dim=head_dim * 4, n_heads=4, rope_theta=theta)
    got = _freqs_of(args)
    expected = torch.tensor(_hf_llama3_inv_freq(head_dim, theta), dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-9)
    if head_dim == 128:
        # all three regimes are exercised: kept, blended and fully scaled
        plain = torch.tensor([1.0 / theta ** (i / head_dim) for i in range(0, head_dim, 2)],
                             dtype=torch.float64)
        ratio = plain / expected
        assert (ratio - 1).abs().lt(1e-9).any()
        assert (ratio - 8).abs().lt(1e-9).any()
        assert ((ratio > 1.01) & (ratio < 7.99)).any()


def test_unscaled_rope_is_plain():
    args = ModelArgs(dim=512, n_heads=4, rope_theta=500000.0, use_scaled_rope=False)
    got = _freqs_of(args)
    expected = torch.tensor([1.0 / 500000.0 ** (i / 128) for i in range(0, 128, 2)], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-9)
    # positions: angle grows linearly with position
    cis = precompute_freqs_cis(args, 10)
    torch.testing.assert_close(cis[7].angle()[-8:].double(), (7 * expected[-8:]), rtol=1e-4, atol=1e-6)


def test_gqa_forward_shape(debug0):
    args, model = debug0.args, debug0
    assert args.num_kv_heads < args.n_heads  # GQA
    assert model.layers["0"].attention.wk.weight.shape[0] < model.layers["0"].attention.wq.weight.shape[0]
    tokens = torch.randint(0, args.vocab_size, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(tokens)
    assert logits.shape == (3, 17, args.vocab_size)
    assert torch.isfinite(logits).all()


def test_forward_is_causal(debug0):
    args, model = debug0.args, debug0
    tokens = torch.randint(0, args.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    changed = tokens.clone()
    changed[:, 20] = (changed[:, 20] + 1) % args.vocab_size
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :20], b[:, :20], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_backward_runs(debug0):
    args, model = debug0.args, copy.deepcopy(debug0)
    tokens = torch.randint(0, args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.freqs_cis.grad is None


def test_with_max_seq_len_keeps_state_dict_compatible(debug0):
    args = LLAMA3_FLAVORS["debugmodel"]
    a = build_model(args.with_max_seq_len(32), seed=0)
    assert a.freqs_cis.shape[0] == 32 and debug0.freqs_cis.shape[0] == args.max_seq_len
    # init does not depend on max_seq_len, and freqs_cis is not saved, so strict loading works
    _assert_same(a.state_dict(), debug0.state_dict())
    copy.deepcopy(debug0).load_state_dict(a.state_dict())
    torch.testing.assert_close(a.freqs_cis, debug0.freqs_cis[:32])
