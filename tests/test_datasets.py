"""Datasets read through the `datasets` library: local text, JSONL, Parquet and save_to_disk folders,
the shipped c4_test sample, and training on them with the BPE tokenizer (resumed, every sample read once)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from savepoint.data.dataset import DATASETS, build_dataloader, load_token_stream, read_documents
from savepoint.data.tokenizer import HFTokenizer
from savepoint.errors import SavepointError
from tests.conftest import ROOT, losses

datasets = pytest.importorskip("datasets")
TOKENIZER = str(ROOT / "tests" / "assets" / "tokenizer")
DOCS = [f"Document {i}: " + " ".join(f"word{j * i % 97}" for j in range(40 + i)) for i in range(60)]


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d, "url": f"u{i}"}) + "\n" for i, d in enumerate(docs)))
    return path


def write_parquet(path: Path, docs: list[str]) -> Path:
    datasets.Dataset.from_dict({"text": docs, "id": list(range(len(docs)))}).to_parquet(str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("datasets")
    (root / "folder").mkdir()
    (root / "folder" / "a.txt").write_text(DOCS[0])
    write_jsonl(root / "folder" / "b.jsonl", DOCS[1:3])
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(root / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS[:5]})}).save_to_disk(str(root / "dict"))
    return {"jsonl": write_jsonl(root / "docs.jsonl", DOCS), "parquet": write_parquet(root / "docs.parquet", DOCS),
            "folder": root / "folder", "saved": root / "saved", "dict": root / "dict", "root": root}


def test_every_format_reads_the_same_documents(files):
    assert read_documents(files["jsonl"]) == DOCS
    assert read_documents(files["parquet"]) == DOCS
    assert read_documents(files["saved"]) == DOCS
    assert read_documents(files["dict"]) == DOCS[:5]
    assert read_documents(files["folder"]) == DOCS[:3]  # sorted files; a .txt file is one document


def test_token_stream_is_the_tokenized_documents_joined(files):
    tokenizer = HFTokenizer(TOKENIZER)
    stream = load_token_stream("c4", str(files["parquet"]), TOKENIZER)  # any name with a path
    expected = [i for doc in DOCS for i in tokenizer.encode(doc)]
    assert stream.tolist() == expected
    assert int((stream == tokenizer.eos_id).sum()) == len(DOCS) == int((stream == tokenizer.bos_id).sum())


def test_bad_datasets_fail_with_one_line(files):
    root = files["root"]
    write_jsonl(root / "notext.jsonl", [])
    (root / "notext.jsonl").write_text('{"content": "x"}\n')
    (root / "nums.jsonl").write_text('{"text": "fine"}\n{"text": 7}\n')
    (root / "data.csv").write_text("text\nx\n")
    (root / "empty").mkdir()
    cases = {root / "notext.jsonl": r"has no \"text\" field \(it has \['content'\]\)",
             root / "nums.jsonl": "cannot be read as json|not a string",
             root / "data.csv": "unknown file type; use .txt, .jsonl",
             root / "empty": "holds no .txt, .jsonl, .json, .parquet files",
             root / "missing": "does not exist"}
    for path, message in cases.items():
        with pytest.raises(SavepointError, match=message) as info:
            read_documents(path)
        assert "--training.dataset_path" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(SavepointError, match=r"unknown dataset 'c4'.*--training.dataset_path"):
        load_token_stream("c4")


def test_c4_test_ships_and_is_reproducible():
    from scripts.make_c4_test import OUT, documents

    lines = OUT.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == documents()
    assert 200_000 < OUT.stat().st_size < 600_000 and len(lines) > 300
    assert OUT.parent == DATASETS["c4_test"]
    loader = build_dataloader("c4_test", seq_len=64, local_batch_size=2, seed=0, tokenizer_path=TOKENIZER)
    inputs, _ = loader.next_batch()
    assert inputs.shape == (2, 64) and int(inputs.max()) < 2000


def test_positions_across_dp_degrees_and_epochs_read_every_sample_once(files):
    """dp 2 -> dp 4 -> dp 1 at the same global batch, across an epoch boundary: the global sample stream."""
    def loaders(degree: int, state: dict | None):
        out = [build_dataloader("x", 16, 8 // degree, 0, dp_rank=r, dp_degree=degree, tokenizer_path=TOKENIZER,
                                dataset_path=str(files["jsonl"])) for r in range(degree)]
        for loader in out:
            if state is not None:
                loader.load_state_dict(state)
        return out

    n = loaders(1, None)[0].stream.samples_per_epoch
    steps = -(-n // 8) + 2  # past the end of the first epoch
    read: list[torch.Tensor] = []
    state = None
    for degree, count in ((2, steps // 3), (4, steps // 3), (1, steps - 2 * (steps // 3))):
        ranks = loaders(degree, state)
        for _ in range(count):
            read.extend(row for loader in ranks for row in loader.next_batch()[0])
        state = ranks[0].state_dict()
        assert all(loader.state_dict() == state for loader in ranks)
    reference = loaders(1, None)[0]
    assert state["sample_index"] == steps * 8
    for i, row in enumerate(read):  # sample i of the global stream, in its order
        assert torch.equal(row, reference.stream[i][:-1]), i
    first_epoch = {reference.stream.chunk_of(i) for i in range(n)}
    assert first_epoch == set(range(n))  # every chunk of the epoch once


def _samples(dump: Path) -> dict[int, list[int]]:
    lines = (dump / "metrics.jsonl").read_text().splitlines()
    return {rec["step"]: rec["samples"] for rec in map(json.loads, lines) if "samples" in rec}


def _data(path: Path) -> list[str]:
    return ["--training.dataset_path", str(path), "--model.hf_assets_path", TOKENIZER, "--training.seq_len", "16",
            "--training.steps", "4", "--checkpoint.interval", "2"]


def test_training_on_jsonl_resumes_where_it_stopped(train, tmp_path, files):
    first = train(*_data(files["jsonl"]), stop_after=2)
    assert torch.equal(first.dataloader.stream.tokens, load_token_stream("x", str(files["jsonl"]), TOKENIZER))
    resumed = train(*_data(files["jsonl"]))
    assert resumed.loaded_step == 2 and resumed.train_state.step == 4
    # each step reads the next 2 samples of the global stream: none skipped, none twice, across the resume
    assert _samples(tmp_path / "run") == {s: [2 * s - 2, 2 * s] for s in range(1, 5)}
    assert resumed.dataloader.state_dict()["sample_index"] == 8


def test_training_on_parquet_reads_its_documents(train, tmp_path, files):
    trainer = train(*_data(files["parquet"]), "--training.steps", "1", "--checkpoint.no_enable")
    stream = trainer.dataloader.stream.tokens
    assert torch.equal(stream, load_token_stream("x", str(files["parquet"]), TOKENIZER))
    assert stream.numel() > 1000 and int(stream.max()) < 2000
    assert sorted(losses(tmp_path / "run")) == [1]


def test_a_tokenizer_larger_than_the_model_fails_before_training(files):
    with pytest.raises(SavepointError, match=r"has 2000 token ids but the model's vocab_size is 1024"):
        build_dataloader("pydocs", 16, 2, 0, tokenizer_path=TOKENIZER, vocab_size=1024)
    assert build_dataloader("pydocs", 16, 2, 0, tokenizer_path=TOKENIZER, vocab_size=2048).stream.tokens.numel() > 0
