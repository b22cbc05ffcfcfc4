"""Hugging Face safetensors during training: the final save as an HF folder, and initial loads from one.

transformers (a test-only dependency) is the reference: it must load the export as it is and
compute the same logits as our model.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from savepoint.checkpoint.storage import CheckpointFolder
from savepoint.errors import CheckpointError, SavepointError
from savepoint.hf.folder import HFFolder
from savepoint.hf.llama3 import to_hf_key, to_hf_tensor
from savepoint.models.llama3 import LLAMA3_FLAVORS
from tests.conftest import ROOT
from tests.convert_support import load_in_transformers

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HF_FINAL = ["--checkpoint.last_save_model_only", "--checkpoint.last_save_in_hf", "--training.steps", "6"]


def hf_logits(folder, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True,
                                                              torch_dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(tokens).logits


def our_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(tokens)


def test_final_save_in_hf_loads_in_transformers(train, tmp_path):
    assets = tmp_path / "assets"
    assets.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "tests/assets/tokenizer" / name, assets / name)
    (assets / "model.safetensors").write_text("not copied: weights never come from the assets folder")
    (assets / "config.json").write_text(json.dumps({"bos_token_id": 128000, "eos_token_id": [128001, 128009]}))
    trainer = train(*HF_FINAL, "--model.hf_assets_path", str(assets))
    step6 = tmp_path / "run/checkpoint/step-6"
    assert sorted(p.name for p in step6.iterdir()) == [
        "config.json", "generation_config.json", "manifest.json", "model.safetensors", "model.safetensors.index.json",
        "tokenizer.json", "tokenizer_config.json"]
    assert json.loads((step6 / "manifest.json").read_text())["kind"] == "hf"
    assert CheckpointFolder(tmp_path / "run/checkpoint").committed_steps() == [5, 6]

    # every tensor is the model's, under its HF name, with q/k permuted
    folder = HFFolder(step6)
    args = LLAMA3_FLAVORS["debugmodel"]
    state = trainer.model.state_dict()
    assert sorted(folder.keys()) == sorted(to_hf_key(k) for k in state)
    for key, value in state.items():
        assert torch.equal(folder.read(to_hf_key(key)), to_hf_tensor(key, value, args)), key

    tokens = torch.randint(0, args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    diff = (hf_logits(step6, tokens) - our_logits(trainer.model, tokens)).abs().max().item()
    assert diff < 1e-5, diff
    config = json.loads((step6 / "config.json").read_text())  # token ids from the assets' config.json
    assert (config["bos_token_id"], config["eos_token_id"]) == (128000, [128001, 128009])
    _, warned = load_in_transformers(step6)
    assert warned == []  # e.g. no "original_max_position_embeddings ... must be less than max_position_embeddings"


def test_final_save_in_hf_without_assets_warns_at_start(train, tmp_path, caplog):
    train(*HF_FINAL, stop_after=0)
    assert "--model.hf_assets_path is not set: the Hugging Face export will have no tokenizer files" in caplog.text
    caplog.clear()
    (tmp_path / "empty").mkdir()
    train(*HF_FINAL, "--model.hf_assets_path", str(tmp_path / "empty"), dump=tmp_path / "run2", stop_after=0)
    assert f"--model.hf_assets_path={tmp_path / 'empty'} holds no tokenizer files" in caplog.text


def test_final_save_in_hf_bf16(train, tmp_path):
    train(*HF_FINAL, "--checkpoint.export_dtype", "bfloat16")
    folder = HFFolder(tmp_path / "run/checkpoint/step-6")
    assert {folder.entries[k][2] for k in folder.keys()} == {"BF16"}
    assert json.loads((tmp_path / "run/checkpoint/step-6/config.json").read_text())["torch_dtype"] == "bfloat16"


def test_auto_resume_refuses_an_hf_step(train, tmp_path):
    train(*HF_FINAL)
    with pytest.raises(CheckpointError, match=r"step-6 is a Hugging Face export.*--checkpoint.load_step 5"):
        train(*HF_FINAL[:-2], "--training.steps", "8")
    with pytest.raises(CheckpointError, match="is a Hugging Face export"):
        train("--checkpoint.load_step", "6", "--training.steps", "8")


def test_initial_load_in_hf(train, tmp_path):
    exported = train(*HF_FINAL, dump=tmp_path / "export")
    source = tmp_path / "export/checkpoint/step-6"
    fresh = train("--checkpoint.initial_load_path", str(source), "--checkpoint.initial_load_in_hf",
                  "--training.steps", "6", dump=tmp_path / "fresh", stop_after=0)
    for key, value in exported.model.state_dict().items():
        assert torch.equal(fresh.model.state_dict()[key], value), key
    assert fresh.train_state.step == 0

    # --model.hf_assets_path is the fallback source
    via_assets = train("--model.hf_assets_path", str(source), "--checkpoint.initial_load_in_hf",
                       "--training.steps", "6", dump=tmp_path / "assets", stop_after=0)
    assert torch.equal(via_assets.model.state_dict()["output.weight"], exported.model.state_dict()["output.weight"])


def test_initial_load_in_hf_errors(train, tmp_path):
    with pytest.raises(CheckpointError, match="needs a folder"):
        train("--checkpoint.initial_load_in_hf", stop_after=0)
    with pytest.raises(CheckpointError, match="holds no \\*.safetensors"):
        (tmp_path / "empty").mkdir()
        train("--checkpoint.initial_load_in_hf", "--checkpoint.initial_load_path", str(tmp_path / "empty"),
              stop_after=0)
    with pytest.raises(SavepointError, match="hf_assets_path=.*is not a folder"):  # the tokenizer's folder
        train(*HF_FINAL, "--model.hf_assets_path", str(tmp_path / "nope"))
