"""The byte tokenizer, the pydocs token stream, the seeded sample stream and the stateful loader."""

from __future__ import annotations

import pytest
import torch

from savepoint.data.dataset import DataLoader, SampleStream, build_dataloader, load_token_stream
from savepoint.data.tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE, ByteTokenizer
from savepoint.errors import SavepointError

SEQ_LEN = 64


# ---------------------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("text", [
    "",
    "hello, world",
    "naïve café — Ελληνικά, русский, 日本語, 한국어, עברית, العربية",
    "emoji 🦙🔥👩‍👩‍👧 and combining e\u0301 and \u0000 nul, \ttabs\nnewlines\r\n",
    "astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \U0010FFFF and BMP edge \uFFFD\uFEFF",
])
def test_tokenizer_round_trips(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    assert ids[1:-1] == list(text.encode("utf-8"))
    assert all(0 <= i < VOCAB_SIZE for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, bos=False, eos=False)) == text


def test_tokenizer_random_unicode_round_trips():
    gen = torch.Generator().manual_seed(0)
    tok = ByteTokenizer()
    # random code points across all planes, skipping surrogates (not encodable as UTF-8)
    cps = torch.randint(0, 0x110000, (5000,), generator=gen).tolist()
    text = "".join(chr(c) for c in cps if not 0xD800 <= c <= 0xDFFF)
    assert tok.decode(tok.encode(text)) == text


def test_tokenizer_special_ids():
    tok = ByteTokenizer()
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (256, 257, 258)
    assert (BOS_ID, EOS_ID, VOCAB_SIZE) == (256, 257, 258)
    assert tok.encode("a", bos=False, eos=False) == [97]
    assert tok.encode("a", bos=True, eos=False) == [256, 97]
    assert tok.encode("a", bos=False, eos=True) == [97, 257]


# ------------------------------------------------------------------------------------- token stream


def test_byte_vocabulary_fits_the_debug_flavor():
    """The debug flavor has TorchTitan's debugmodel vocabulary; every byte tokenizer id has an embedding row."""
    from savepoint.models.llama3.args import LLAMA3_FLAVORS

    assert LLAMA3_FLAVORS["debugmodel"].vocab_size == 2048
    assert max(BOS_ID, EOS_ID, 255) < VOCAB_SIZE <= LLAMA3_FLAVORS["debugmodel"].vocab_size


def test_pydocs_stream_is_nontrivial_and_deterministic():
    tokens = load_token_stream("pydocs")
    assert tokens.dtype == torch.int64 and tokens.dim() == 1
    assert tokens.numel() > 100_000
    assert tokens[0] == BOS_ID and tokens[-1] == EOS_ID
    assert int(tokens.min()) >= 0 and int(tokens.max()) < VOCAB_SIZE
    n_docs = int((tokens == BOS_ID).sum())
    assert n_docs > 1 and n_docs == int((tokens == EOS_ID).sum())
    load_token_stream.cache_clear()
    again = load_token_stream("pydocs")
    assert again is not tokens and torch.equal(again, tokens)


def test_unknown_dataset_raises():
    with pytest.raises(SavepointError, match="--training.dataset") as info:
        load_token_stream("no_such_dataset")
    assert "no_such_dataset" in str(info.value) and "pydocs" in str(info.value)
    with pytest.raises(SavepointError, match="--training.dataset"):
        build_dataloader("no_such_dataset", seq_len=8, local_batch_size=1, seed=0)


def test_seq_len_longer_than_corpus_raises():
    n = load_token_stream("pydocs").numel()
    with pytest.raises(SavepointError, match="--training.seq_len"):
        build_dataloader("pydocs", seq_len=n, local_batch_size=1, seed=0)
    with pytest.raises(SavepointError, match="--training.seq_len"):
        SampleStream(torch.arange(10), seq_len=10, seed=0)
    # the largest seq_len that fits gives exactly one sample
    assert SampleStream(torch.arange(10), seq_len=9, seed=0).samples_per_epoch == 1


# ------------------------------------------------------------------------------------ sample stream


@pytest.fixture(scope="module")
def stream() -> SampleStream:
    return SampleStream(load_token_stream("pydocs"), SEQ_LEN, seed=0)


def test_samples_have_seq_len_plus_one_tokens(stream):
    n = stream.samples_per_epoch
    assert n == (stream.tokens.numel() - 1) // SEQ_LEN
    for i in [0, 1, n - 1, n, 2 * n + 5, 3 * n - 1]:
        sample = stream[i]
        assert sample.shape == (SEQ_LEN + 1,)
        start = stream.chunk_of(i) * SEQ_LEN
        assert torch.equal(sample, stream.tokens[start : start + SEQ_LEN + 1])
    # the last chunk of the corpus is still complete
    assert stream.tokens[(n - 1) * SEQ_LEN :].numel() >= SEQ_LEN + 1


def test_epoch_visits_every_chunk_once(stream):
    n = stream.samples_per_epoch
    for epoch in range(3):
        chunks = [stream.chunk_of(epoch * n + p) for p in range(n)]
        assert sorted(chunks) == list(range(n))


def test_epochs_are_reshuffled(stream):
    n = stream.samples_per_epoch
    orders = [stream.epoch_order(e).tolist() for e in range(3)]
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]
    assert orders[0] != list(range(n))  # actually shuffled
    # the cache does not change results when epochs are visited out of order
    assert [stream.chunk_of(p) for p in range(5)] == orders[0][:5]
    assert [stream.chunk_of(n + p) for p in range(5)] == orders[1][:5]


def test_order_depends_only_on_seed(stream):
    same = SampleStream(load_token_stream("pydocs"), SEQ_LEN, seed=0)
    other = SampleStream(load_token_stream("pydocs"), SEQ_LEN, seed=1)
    for epoch in range(2):
        assert torch.equal(same.epoch_order(epoch), stream.epoch_order(epoch))
        assert not torch.equal(other.epoch_order(epoch), stream.epoch_order(epoch))


# --------------------------------------------------------------------------------------- dataloader


def _loader(dp_rank=0, dp_degree=1, bs=4, seed=0) -> DataLoader:
    return build_dataloader("pydocs", seq_len=SEQ_LEN, local_batch_size=bs, seed=seed,
                            dp_rank=dp_rank, dp_degree=dp_degree)


def test_batches_shapes_and_shift():
    loader = _loader(bs=4)
    for _ in range(3):
        indices = loader.local_indices()
        inputs, labels = loader.next_batch()
        assert inputs.shape == labels.shape == (4, SEQ_LEN)
        assert inputs.dtype == labels.dtype == torch.int64
        assert torch.equal(inputs[:, 1:], labels[:, :-1])
        full = torch.stack([loader.stream[i] for i in indices])
        assert torch.equal(inputs, full[:, :-1]) and torch.equal(labels, full[:, 1:])


def test_dp_ranks_partition_the_global_stream():
    steps, bs = 6, 3
    ranks = [_loader(dp_rank=r, dp_degree=2, bs=bs) for r in range(2)]
    single = _loader(dp_rank=0, dp_degree=1, bs=2 * bs)
    seen: list[int] = []
    for _ in range(steps):
        union = ranks[0].local_indices() + ranks[1].local_indices()
        expected = single.local_indices()
        assert union == expected
        batches = [r.next_batch() for r in ranks]
        ref_inputs, ref_labels = single.next_batch()
        assert torch.equal(torch.cat([b[0] for b in batches]), ref_inputs)
        assert torch.equal(torch.cat([b[1] for b in batches]), ref_labels)
        seen += union
    assert seen == list(range(steps * 2 * bs))
    assert ranks[0].sample_index == ranks[1].sample_index == single.sample_index == steps * 2 * bs


def test_resume_dp2_checkpoint_at_dp1():
    bs = 3
    # uninterrupted dp=2 run: per-step global indices (rank 0 then rank 1)
    ranks = [_loader(dp_rank=r, dp_degree=2, bs=bs) for r in range(2)]
    straight: list[list[int]] = []
    for _ in range(7):
        straight.append(ranks[0].local_indices() + ranks[1].local_indices())
        for r in ranks:
            r.next_batch()

    # interrupted dp=2 run: 3 steps, then checkpoint
    ranks = [_loader(dp_rank=r, dp_degree=2, bs=bs) for r in range(2)]
    before: list[int] = []
    for _ in range(3):
        before += ranks[0].local_indices() + ranks[1].local_indices()
        for r in ranks:
            r.next_batch()
    state = ranks[0].state_dict()
    assert state == ranks[1].state_dict()
    assert state["sample_index"] == 3 * 2 * bs and state["dp_degree"] == 2

    # resume at dp=1 with the same global batch size
    resumed = _loader(dp_rank=0, dp_degree=1, bs=2 * bs)
    resumed.load_state_dict(state)
    after: list[int] = []
    for _ in range(4):
        after += resumed.local_indices()
        resumed.next_batch()

    assert before == sum(straight[:3], [])
    assert after == sum(straight[3:], [])  # no skip, no repeat
    assert len(set(before + after)) == len(before + after)


def test_state_dict_round_trip():
    loader = _loader(dp_rank=1, dp_degree=2, bs=2)
    for _ in range(5):
        loader.next_batch()
    state = loader.state_dict()
    assert state == {"sample_index": 20, "dp_degree": 2}

    fresh = _loader(dp_rank=1, dp_degree=2, bs=2)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    for _ in range(3):
        assert fresh.local_indices() == loader.local_indices()
        a, b = fresh.next_batch(), loader.next_batch()
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert fresh.state_dict() == loader.state_dict()


def test_loader_crosses_epoch_boundary():
    loader = _loader(bs=4)
    n = loader.stream.samples_per_epoch
    loader.load_state_dict({"sample_index": n - 2, "dp_degree": 1})
    indices = loader.local_indices()
    assert indices == [n - 2, n - 1, n, n + 1]
    inputs, _ = loader.next_batch()
    assert inputs.shape == (4, SEQ_LEN)
    assert loader.sample_index == n + 2
