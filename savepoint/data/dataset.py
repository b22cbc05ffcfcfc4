"""The offline dataset and its stateful loader.

The corpus is one token stream cut into samples of ``seq_len + 1`` tokens. Samples are visited in
a seeded random order that is reshuffled every epoch. The loader's whole state is the position in
that *global* sample stream, so a checkpoint taken at one data-parallel degree resumes at another
without skipping or repeating a sample.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful

from savepoint.data.tokenizer import ByteTokenizer
from savepoint.errors import SavepointError
from savepoint.values import check_count

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
DATASETS = {"pydocs": ASSETS / "pydocs.txt"}
DOC_SEPARATOR = "\n\n\n"
EPOCH_SEED_STRIDE = 1_000_003  # epoch e of seed s is shuffled with seed s * stride + e
MAX_SAMPLE_INDEX = 2**63 - 1  # positions are int64 wherever torch or TorchTitan stores them


@lru_cache(maxsize=4)
def load_token_stream(dataset: str) -> torch.Tensor:
    """Every document of ``dataset`` as BOS + bytes + EOS, concatenated: [n_tokens] int64."""
    if dataset not in DATASETS:
        raise SavepointError(
            f"unknown dataset {dataset!r}; set --training.dataset to one of {sorted(DATASETS)}"
        )
    tokenizer = ByteTokenizer()
    ids: list[int] = []
    for doc in DATASETS[dataset].read_text(encoding="utf-8").split(DOC_SEPARATOR):
        if doc.strip():
            ids.extend(tokenizer.encode(doc.strip()))
    return torch.tensor(ids, dtype=torch.int64)


class SampleStream:
    """Global sample ``i`` -> ``seq_len + 1`` tokens, in a fresh seeded order each epoch."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, seed: int):
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.samples_per_epoch = (len(tokens) - 1) // seq_len
        if self.samples_per_epoch < 1:
            raise SavepointError(
                f"--training.seq_len {seq_len} is longer than the whole dataset "
                f"({len(tokens)} tokens); lower it"
            )
        self._order: tuple[int, torch.Tensor] | None = None

    @property
    def max_index(self) -> int:
        """The last sample index the stream can address: int64, and every epoch's seed fits torch's generator."""
        epochs = (2**64 - 1) - self.seed * EPOCH_SEED_STRIDE  # manual_seed takes an unsigned 64-bit seed
        return min(MAX_SAMPLE_INDEX, epochs * self.samples_per_epoch - 1)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * EPOCH_SEED_STRIDE + epoch)
            self._order = (epoch, torch.randperm(self.samples_per_epoch, generator=gen))
        return self._order[1]

    def chunk_of(self, index: int) -> int:
        epoch, pos = divmod(index, self.samples_per_epoch)
        return int(self.epoch_order(epoch)[pos])

    def __getitem__(self, index: int) -> torch.Tensor:
        start = self.chunk_of(index) * self.seq_len
        return self.tokens[start : start + self.seq_len + 1]


class DataLoader(Stateful):
    """Yields ``(inputs, labels)`` of shape [local_batch_size, seq_len] for one data-parallel rank.

    Step ``s`` consumes global samples ``[pos, pos + local_batch_size * dp_degree)``; rank ``r``
    takes the ``r``-th contiguous block of ``local_batch_size``.
    """

    def __init__(self, stream: SampleStream, local_batch_size: int, dp_rank: int = 0, dp_degree: int = 1):
        self.stream = stream
        self.local_batch_size = local_batch_size
        self.dp_rank = dp_rank
        self.dp_degree = dp_degree
        self.sample_index = 0  # next unread position in the global sample stream

    def local_indices(self) -> list[int]:
        """Global sample indices the next batch of this rank will hold."""
        first = self.sample_index + self.dp_rank * self.local_batch_size
        return list(range(first, first + self.local_batch_size))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = torch.stack([self.stream[i] for i in self.local_indices()])  # [bs, seq_len + 1]
        self.sample_index += self.local_batch_size * self.dp_degree
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        # dp_degree is informational: the position is global, so loading works at any degree.
        # Every rank holds the same values, so the checkpoint keeps one copy.
        return {"sample_index": self.sample_index, "dp_degree": self.dp_degree}

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The position is an int the stream can address (>= 0); ``dp_degree`` a degree >= 1.

        Raises:
            LoadedValueError: naming the bad key.
        """
        check_count("sample_index", state_dict.get("sample_index"), maximum=self.stream.max_index)
        if "dp_degree" in state_dict:
            check_count("dp_degree", state_dict["dp_degree"], minimum=1, maximum=2**31 - 1)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.check_state_dict(state_dict)
        self.sample_index = int(state_dict["sample_index"])
        saved_degree = int(state_dict.get("dp_degree", self.dp_degree))
        if saved_degree != self.dp_degree:
            logger.info("data loader saved at data-parallel degree %d, resumed at %d: the global sample "
                        "stream continues at sample %d", saved_degree, self.dp_degree, self.sample_index)


def build_dataloader(dataset: str, seq_len: int, local_batch_size: int, seed: int,
                     dp_rank: int = 0, dp_degree: int = 1) -> DataLoader:
    stream = SampleStream(load_token_stream(dataset), seq_len, seed)
    return DataLoader(stream, local_batch_size, dp_rank, dp_degree)
