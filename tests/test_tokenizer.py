"""Hugging Face tokenizer folders (``--model.hf_assets_path``): the shipped BPE tokenizer, BOS/EOS from
tokenizer_config.json, post-processors that add their own BOS, and bad folders; transformers is the reference."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from savepoint.data.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer
from savepoint.errors import SavepointError
from tests.conftest import ROOT

tokenizers = pytest.importorskip("tokenizers")
SHIPPED = ROOT / "tests" / "assets" / "tokenizer"
TEXTS = ["", "hello, world", "def f(x):\n    return x ** 2  # squares\n",
         "naïve café — Ελληνικά, 日本語, emoji 🦙 and \u0000 nul\r\n"]


def copy_shipped(dst: Path) -> Path:
    dst.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SHIPPED / name, dst / name)
    return dst


def test_shipped_tokenizer_is_a_2000_token_bpe_with_bos_and_eos():
    tok = HFTokenizer(SHIPPED)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2000)
    assert json.loads((SHIPPED / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids[0] == 0 and ids[-1] == 1 and 0 not in ids[1:] and 1 not in ids[:-1]
        assert all(0 <= i < 2000 for i in ids)
        assert tok.decode(ids) == text
        assert tok.encode(text, bos=False, eos=False) == ids[1:-1]
    assert len(tok.encode("The module defines the following functions")) < 20  # merges, not bytes
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]


def test_make_tokenizer_reproduces_the_shipped_files(tmp_path):
    from scripts.make_tokenizer import main

    assert main([str(tmp_path)]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (SHIPPED / name).read_bytes(), name


def test_transformers_reads_the_same_ids():
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(SHIPPED), local_files_only=True)
    tok = HFTokenizer(SHIPPED)
    assert (hf.bos_token_id, hf.eos_token_id) == (tok.bos_id, tok.eos_id)
    for text in TEXTS:
        assert hf(text)["input_ids"] == tok.encode(text, bos=False, eos=False)


def test_a_post_processor_that_adds_bos_does_not_add_it_twice(tmp_path):
    folder = copy_shipped(tmp_path / "llama_like")
    raw = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    raw.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
    raw.save(str(folder / "tokenizer.json"))
    tok, plain = HFTokenizer(folder), HFTokenizer(SHIPPED)
    for text in TEXTS:
        assert tok.encode(text) == plain.encode(text)
        assert tok.encode(text, bos=False, eos=False) == plain.encode(text, bos=False, eos=False)


def test_special_tokens_as_dicts_and_added_tokens(tmp_path):
    folder = copy_shipped(tmp_path / "dicts")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["bos_token"] = {"content": "<|begin_of_text|>", "__type": "AddedToken"}
    config["eos_token"] = "<|eot|>"  # not in the vocabulary yet: added after it, as transformers does
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = HFTokenizer(folder)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 2000, 2001)
    assert tok.encode("x <|eot|>", bos=False) == tok.encode("x ", bos=False, eos=False) + [2000, 2000]


def test_bad_tokenizer_folders_fail_with_one_line(tmp_path):
    bad_json = copy_shipped(tmp_path / "bad_json")
    (bad_json / "tokenizer.json").write_text("{}")
    no_eos = copy_shipped(tmp_path / "no_eos")
    (no_eos / "tokenizer_config.json").write_text('{"bos_token": "<|begin_of_text|>"}')
    bad_config = copy_shipped(tmp_path / "bad_config")
    (bad_config / "tokenizer_config.json").write_text('{"eos_token": 5}')
    linked = copy_shipped(tmp_path / "linked")
    (tmp_path / "secret").write_text("password=hunter2\n")
    (linked / "tokenizer.json").unlink()
    (linked / "tokenizer.json").symlink_to(tmp_path / "secret")
    cases = {bad_json: "is not a tokenizer the `tokenizers` library reads", no_eos: "names no eos_token",
             bad_config: "eos_token is 5; it must be a token string", linked: "tokenizer.json is a symbolic link",
             tmp_path / "missing": "is not a folder"}
    for folder, message in cases.items():
        with pytest.raises(SavepointError, match=message) as info:
            build_tokenizer(str(folder))
        assert str(info.value).startswith("--model.hf_assets_path") and "\n" not in str(info.value)


def test_a_folder_without_tokenizer_json_trains_with_bytes(tmp_path, caplog):
    (tmp_path / "weights").mkdir()
    with caplog.at_level(logging.WARNING):
        assert isinstance(build_tokenizer(str(tmp_path / "weights")), ByteTokenizer)
    assert "holds no tokenizer.json: training uses the byte tokenizer" in caplog.text
    assert isinstance(build_tokenizer(None), ByteTokenizer)


def test_hugging_face_cache_snapshot_links_are_followed(tmp_path):
    repo = tmp_path / "models--x--tok"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    for i, name in enumerate(("tokenizer.json", "tokenizer_config.json")):
        shutil.copy(SHIPPED / name, repo / "blobs" / f"{i:040x}")
        (snapshot / name).symlink_to(os.path.relpath(repo / "blobs" / f"{i:040x}", snapshot))
    assert HFTokenizer(snapshot).encode("hi") == HFTokenizer(SHIPPED).encode("hi")


def test_hf_export_of_a_bpe_run_tokenizes_and_generates(train, tmp_path, caplog):
    transformers = pytest.importorskip("transformers")
    import torch

    from tests.convert_support import load_in_transformers

    train("--model.hf_assets_path", str(SHIPPED), "--training.dataset", "c4_test", "--training.steps", "2",
          "--checkpoint.interval", "10", "--checkpoint.last_save_model_only", "--checkpoint.last_save_in_hf")
    export = tmp_path / "run" / "checkpoint" / "step-2"
    config = json.loads((export / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["vocab_size"]) == (0, 1, 2048)
    assert json.loads((export / "generation_config.json").read_text())["eos_token_id"] == 1
    model, warned = load_in_transformers(export)
    warned = [w for w in map(str, warned) if "torchao" not in w]  # a first import of transformers' quantizers
    assert warned == []  # nothing about max_position_embeddings or generation settings
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(export), local_files_only=True)
    assert hf_tok.eos_token_id == 1
    prompt = hf_tok("The module defines", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, prompt["input_ids"].shape[1] + 5) or int(out[0, -1]) == 1
    assert isinstance(hf_tok.decode(out[0]), str)


def test_hf_export_without_a_tokenizer_says_how_to_include_one(train, caplog):
    with caplog.at_level(logging.WARNING):
        train("--training.steps", "1", "--checkpoint.last_save_model_only", "--checkpoint.last_save_in_hf",
              stop_after=0)
    assert "--model.hf_assets_path is not set: the Hugging Face export will have no tokenizer files" in caplog.text
    assert "set --model.hf_assets_path to the original HF model folder to include them" in caplog.text
