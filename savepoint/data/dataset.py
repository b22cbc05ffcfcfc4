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

from savepoint.data.tokenizer import Tokenizer, build_tokenizer
from savepoint.errors import SavepointError
from savepoint.values import check_count

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
DATASETS = {"pydocs": ASSETS / "pydocs.txt", "c4_test": ASSETS / "c4_test"}  # shipped, read offline
DOC_SEPARATOR = "\n\n\n"  # between the documents of pydocs.txt
# file suffix -> the `datasets` builder that reads it
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".json.gz": "json",
            ".parquet": "parquet"}
EPOCH_SEED_STRIDE = 1_000_003  # epoch e of seed s is shuffled with seed s * stride + e
MAX_SAMPLE_INDEX = 2**63 - 1  # positions are int64 wherever torch or TorchTitan stores them
PATH_FLAG = "--training.dataset_path"


def _builder(path: Path) -> str | None:
    name = path.name.lower()
    return next((b for suffix, b in BUILDERS.items() if name.endswith(suffix)), None)


def _data_files(path: Path) -> list[Path]:
    """The data files a ``--training.dataset_path`` names: the file, or a folder's files (recursively, sorted)."""
    if path.is_file():
        if _builder(path) is None:
            raise SavepointError(f"{PATH_FLAG}={path}: unknown file type; use .txt, .jsonl/.json (a \"text\" field "
                                 "per line), .parquet (a \"text\" column), or a folder of them")
        return [path]
    if not path.is_dir():
        raise SavepointError(f"{PATH_FLAG}={path} does not exist; point it at a dataset file or folder")
    files = sorted(p for p in path.rglob("*") if p.is_file() and _builder(p) is not None
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise SavepointError(f"{PATH_FLAG}={path} holds no .txt, .jsonl, .json, .parquet files and is no `datasets` "
                             "save_to_disk folder; point it at the dataset's files")
    return files


def _texts(dataset: Any, where: str) -> list[str]:
    """The ``text`` column of a `datasets` Dataset, checked."""
    if "text" not in dataset.column_names:
        raise SavepointError(f"{where} has no \"text\" field (it has {dataset.column_names}); each document's text "
                             "must be in a field named \"text\"")
    texts = dataset["text"]
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise SavepointError(f"{where}: document {bad} has text {texts[bad]!r}, not a string; fix or drop it")
    return texts


def _load_from_disk(path: Path) -> list[str]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise SavepointError(f"{PATH_FLAG}={path} holds the splits {sorted(loaded)}, no \"train\"; point it at "
                                 f"one split's folder, e.g. {path / sorted(loaded)[0]}")
        loaded = loaded["train"]
    return _texts(loaded, f"{PATH_FLAG}={path}")


def read_documents(path: Path) -> list[str]:
    """The documents of a text/JSONL/Parquet file, a folder of them, or a `datasets` save_to_disk folder.

    A .txt file is one document; a JSONL line's or Parquet row's ``text`` field is one.

    Raises:
        SavepointError: nothing readable there, or a file without a ``text`` field, or one `datasets` cannot read.
    """
    import datasets

    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        return _load_from_disk(path)
    docs: list[str] = []
    datasets.disable_progress_bars()
    for file in _data_files(path):
        builder = _builder(file)
        options = {"sample_by": "document"} if builder == "text" else {}
        try:
            loaded = datasets.load_dataset(builder, data_files=[str(file)], split="train", **options)
        except Exception as e:
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise SavepointError(f"{PATH_FLAG}: {file} cannot be read as {builder} ({first}); fix the file") from None
        docs.extend(_texts(loaded, f"{PATH_FLAG}: {file}"))
    return docs


def shipped_documents(dataset: str) -> list[str]:
    """The documents of a dataset savepoint ships (``DATASETS``)."""
    if dataset not in DATASETS:
        raise SavepointError(f"unknown dataset {dataset!r}; set --training.dataset to one of {sorted(DATASETS)}, "
                             f"or {PATH_FLAG} to its files")
    if dataset == "pydocs":
        return DATASETS[dataset].read_text(encoding="utf-8").split(DOC_SEPARATOR)
    return read_documents(DATASETS[dataset])


@lru_cache(maxsize=4)
def load_tokenizer(tokenizer_path: str | None) -> Tokenizer:
    return build_tokenizer(tokenizer_path)


@lru_cache(maxsize=4)
def load_token_stream(dataset: str, dataset_path: str | None = None, tokenizer_path: str | None = None) -> torch.Tensor:
    """Every document as BOS + tokens + EOS, concatenated: [n_tokens] int64.

    Documents come from ``dataset_path`` when set (any ``dataset`` name), else from the shipped
    ``dataset``; ``tokenizer_path`` is an HF tokenizer folder (None: the byte tokenizer).
    """
    docs = shipped_documents(dataset) if dataset_path is None else read_documents(Path(dataset_path))
    docs = [d.strip() for d in docs if d.strip()]
    tokenizer = load_tokenizer(tokenizer_path)
    encode_batch = getattr(tokenizer, "encode_batch", None)
    ids: list[int] = []
    for doc_ids in (encode_batch(docs) if encode_batch else map(tokenizer.encode, docs)):
        ids.extend(doc_ids)
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
                     dp_rank: int = 0, dp_degree: int = 1, *, tokenizer_path: str | None = None,
                     dataset_path: str | None = None, vocab_size: int | None = None) -> DataLoader:
    """The loader of one data-parallel rank.

    Args:
        tokenizer_path: an HF tokenizer folder (``--model.hf_assets_path``); None: the byte tokenizer.
        dataset_path: the dataset's files (``--training.dataset_path``); None: the shipped ``dataset``.
        vocab_size: the model's; every token id must be below it.

    Raises:
        SavepointError: see ``load_token_stream``; or the tokenizer's ids do not fit ``vocab_size``.
    """
    tokenizer = load_tokenizer(tokenizer_path)
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        which = "the byte tokenizer" if tokenizer_path is None else f"--model.hf_assets_path={tokenizer_path}"
        raise SavepointError(
            f"the tokenizer of {which} has {tokenizer.vocab_size} token ids but the "
            f"model's vocab_size is {vocab_size}; pick a --model.flavor whose vocabulary holds them, or that "
            "model's own tokenizer folder")
    stream = SampleStream(load_token_stream(dataset, dataset_path, tokenizer_path), seq_len, seed)
    return DataLoader(stream, local_batch_size, dp_rank, dp_degree)
