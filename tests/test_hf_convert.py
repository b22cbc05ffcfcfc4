"""Offline HF <-> DCP conversion (``savepoint/convert/`` and ``scripts/checkpoint_conversion``).

Tiny random ``LlamaForCausalLM`` folders (GQA) stand in for real downloads; logits are compared with
transformers' own forward, round trips bit by bit, and the real 8B/70B flavors on meta tensors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorProperties, TensorStorageMetadata

from savepoint import convert
from savepoint.convert import check_dcp_keys, convert_from_hf, convert_to_hf, main, partial_path
from savepoint.errors import CheckpointError, ConfigError
from savepoint.hf.llama3 import (
    Llama3HFAdapter,
    check_hf_config,
    from_hf_key,
    from_hf_tensor,
    hf_config,
    to_hf_key,
    to_hf_tensor,
)
from savepoint.models.llama3.args import LLAMA3_FLAVORS, ModelArgs
from savepoint.models.llama3.model import Transformer
from tests.convert_support import (
    DEBUG,
    TINY,
    TOKENS,
    assert_bit_identical,
    assets_folder,
    dcp_tensors,
    hf_tensors,
    one_error_line,
    our_model,
    save_dcp,
    transformers,
)

# ---- logits parity ---------------------------------------------------------------------------------


def test_from_hf_logits_match_transformers(tiny_hf, tmp_path):
    hf, folder = tiny_hf
    out = convert_from_hf(folder, tmp_path / "dcp", TINY, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [".metadata", "__0_0.distcp"]
    saved = FileSystemReader(str(out)).read_metadata().state_dict_metadata
    assert sorted(saved) == sorted(Llama3HFAdapter(TINY).shapes)  # flat model keys, nothing else
    assert {v.properties.dtype for v in saved.values()} == {torch.float32}
    with torch.no_grad():
        diff = (hf(TOKENS).logits - our_model(out, TINY)(TOKENS)).abs().max().item()
    assert diff < 1e-5, diff


def test_to_hf_loads_in_transformers_as_is(tmp_path, flavors):
    flavors(tiny=TINY)
    torch.manual_seed(3)
    ours = Transformer(TINY)
    ours.init_weights()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_dcp(ours.state_dict(), tmp_path / "step-7")
    convert_to_hf(tmp_path / "step-7", tmp_path / "hf", "tiny", hf_assets_path=assets_folder(tmp_path / "assets"),
                  progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    assert hf.dtype == torch.float32
    with torch.no_grad():
        diff = (hf(TOKENS).logits - ours.eval()(TOKENS)).abs().max().item()
    assert diff < 1e-5, diff
    files = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                     "tokenizer.json", "tokenizer_config.json"]
    assert (tmp_path / "hf/tokenizer.json").read_text() == (tmp_path / "assets/tokenizer.json").read_text()
    config = json.loads((tmp_path / "hf/config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, [2, 3])  # from the assets' config.json


# ---- round trips -----------------------------------------------------------------------------------


def test_hf_dcp_hf_round_trip_is_bit_identical(tiny_hf, tmp_path):
    _, folder = tiny_hf
    convert_from_hf(folder, tmp_path / "dcp", TINY, progress=False)
    convert_to_hf(tmp_path / "dcp", tmp_path / "hf", TINY, max_shard_bytes=40_000, progress=False)
    assert len(list((tmp_path / "hf").glob("model-*-of-*.safetensors"))) > 3  # several streamed shards
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(hf_tensors(folder))
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in hf_tensors(folder).values())
    assert_bit_identical(hf_tensors(folder), hf_tensors(tmp_path / "hf"))


def test_dcp_hf_dcp_round_trip_is_bit_identical(tmp_path):
    torch.manual_seed(4)
    state = {k: torch.randn(v.shape) for k, v in Transformer(TINY).state_dict().items()}
    save_dcp(state, tmp_path / "step-1")
    convert_to_hf(tmp_path / "step-1", tmp_path / "hf", TINY, progress=False)
    convert_from_hf(tmp_path / "hf", tmp_path / "dcp", TINY, progress=False)
    assert_bit_identical(state, dcp_tensors(tmp_path / "dcp"))


def test_to_hf_reads_the_metadata_once(tmp_path, monkeypatch):
    save_dcp({k: torch.randn(v.shape) for k, v in Transformer(TINY).state_dict().items()}, tmp_path / "step-1")
    from savepoint.checkpoint import reader as integrity

    real, calls = integrity.safe_unpickle, []
    monkeypatch.setattr(integrity, "safe_unpickle", lambda *a: calls.append(1) or real(*a))
    convert_to_hf(tmp_path / "step-1", tmp_path / "hf", TINY, progress=False)
    assert len(calls) == 1  # not once per tensor


def test_full_training_checkpoint_converts_its_model(train, tmp_path):
    trainer = train(stop_after=5)
    step = tmp_path / "run" / "checkpoint" / "step-5"
    assert any(k.startswith("optimizer.") for k in FileSystemReader(str(step)).read_metadata().state_dict_metadata)
    convert_to_hf(step, tmp_path / "hf", "debugmodel", progress=False)
    got = {from_hf_key(k): from_hf_tensor(from_hf_key(k), t, DEBUG) for k, t in hf_tensors(tmp_path / "hf").items()}
    assert_bit_identical(trainer.model.state_dict(), got)


def test_dtypes(tiny_hf, tmp_path):
    _, folder = tiny_hf
    convert_from_hf(folder, tmp_path / "bf16", TINY, dtype="bfloat16", progress=False)
    convert_from_hf(folder, tmp_path / "fp32", TINY, progress=False)
    bf16, fp32 = dcp_tensors(tmp_path / "bf16"), dcp_tensors(tmp_path / "fp32")
    assert_bit_identical(bf16, {k: v.to(torch.bfloat16) for k, v in fp32.items()})
    convert_to_hf(tmp_path / "fp32", tmp_path / "hf16", TINY, export_dtype="float16", progress=False)
    assert_bit_identical(hf_tensors(tmp_path / "hf16"), {k: v.to(torch.float16) for k, v in hf_tensors(folder).items()})
    assert json.loads((tmp_path / "hf16" / "config.json").read_text())["torch_dtype"] == "float16"
    convert_from_hf(tmp_path / "hf16", tmp_path / "keep", TINY, dtype="keep", progress=False)
    assert {t.dtype for t in dcp_tensors(tmp_path / "keep").values()} == {torch.float16}


def test_tied_embeddings_fill_the_output_layer(tmp_path):
    tensors = {to_hf_key(k): to_hf_tensor(k, torch.randn(s), TINY) for k, s in Llama3HFAdapter(TINY).shapes.items()}
    del tensors["lm_head.weight"]
    (tmp_path / "hf").mkdir()
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"))
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    convert_from_hf(tmp_path / "hf", tmp_path / "dcp", TINY, progress=False)
    got = dcp_tensors(tmp_path / "dcp")
    assert torch.equal(got["output.weight"], tensors["model.embed_tokens.weight"])


# ---- the real flavors, on meta tensors -------------------------------------------------------------


@pytest.mark.parametrize("flavor", ["8B", "70B"])
def test_real_flavor_maps_every_key_both_ways(flavor):
    args = LLAMA3_FLAVORS[flavor]
    adapter = Llama3HFAdapter(args, flavor)
    cfg = {k: v for k, v in hf_config(args, torch.bfloat16).items()
           if k not in ("architectures", "model_type", "torch_dtype")}
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert len(adapter.shapes) == 2 + 9 * args.n_layers + 1
    assert {to_hf_key(k): s for k, s in adapter.shapes.items()} == hf_shapes
    assert {from_hf_key(k) for k in hf_shapes} == set(adapter.shapes)
    sources = adapter.hf_sources(hf_shapes, "meta")
    adapter.check_shapes(hf_shapes, sources, "meta")
    for key, shape in adapter.shapes.items():  # the q/k permutations keep shapes
        meta = torch.empty(shape, device="meta")
        assert tuple(from_hf_tensor(key, to_hf_tensor(key, meta, args), args).shape) == shape
    props = TensorProperties(dtype=torch.bfloat16)
    check_dcp_keys(adapter, {k: TensorStorageMetadata(props, torch.Size(s), []) for k, s in adapter.shapes.items()},
                   "meta")
    check_hf_config(hf_config(args, torch.bfloat16), args, flavor, "meta")


# ---- bad inputs: one clear error each --------------------------------------------------------------


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy an HF folder, passing its tensors through ``edit(dict)``, into one model.safetensors."""
    dst.mkdir()
    tensors = hf_tensors(src)
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


BAD_HF = {
    "missing": (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
                ["'model.layers.1.mlp.up_proj.weight'", "is missing", "debugmodel"]),
    "extra layer": (lambda t: t.update({"model.layers.6.self_attn.q_proj.weight": torch.zeros(256, 256)}),
                    ["'model.layers.6.self_attn.q_proj.weight'", "has no place", "debugmodel", "--model_flavor"]),
    "unknown tensor": (lambda t: t.update({"model.vision_tower.weight": torch.zeros(2)}),
                       ["'model.vision_tower.weight'", "no mapping"]),
}


@pytest.mark.parametrize("case", list(BAD_HF))
def test_bad_hf_folder_fails_with_one_clear_error(debug_hf, tmp_path, case, capsys):
    edit, words = BAD_HF[case]
    bad = _rewrite(debug_hf, tmp_path / "bad", edit)
    assert main(["from_hf", str(bad), str(tmp_path / "out"), "--model_flavor", "debugmodel"]) == 1
    line = one_error_line(capsys.readouterr().err)
    for word in words:
        assert word in line
    assert not (tmp_path / "out").exists() and not partial_path(tmp_path / "out").exists()


def test_wrong_flavor_names_the_misshapen_tensor(debug_hf, tmp_path, flavors):
    flavors(wide=ModelArgs(dim=512, n_layers=6, n_heads=16, n_kv_heads=8, vocab_size=DEBUG.vocab_size))
    with pytest.raises(CheckpointError, match=r"'model.embed_tokens.weight' has shape \[\d+, 256\] but the Llama 3 "
                                              r"wide model needs \[\d+, 512\]"):
        convert_from_hf(debug_hf, tmp_path / "out", "wide", progress=False)
    assert not (tmp_path / "out").exists()


def test_wrong_head_count_with_the_same_shapes_is_refused(debug_hf, tmp_path, flavors):
    # 8 heads of 32 instead of 16 of 16 (kv: 4 of 32 instead of 8 of 16): every shape agrees, q/k would not.
    flavors(heads8=ModelArgs(dim=256, n_layers=6, n_heads=8, n_kv_heads=4, vocab_size=DEBUG.vocab_size))
    with pytest.raises(CheckpointError, match="num_attention_heads=16 but the Llama 3 heads8 model has 8"):
        convert_from_hf(debug_hf, tmp_path / "out", "heads8", progress=False)


def test_rope_differences_only_warn(caplog):
    llama30 = {"num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096, "rope_theta": 500000.0,
               "rope_scaling": None, "rms_norm_eps": 1e-5}  # Llama 3.0 8B: no llama3 RoPE scaling
    check_hf_config(llama30, LLAMA3_FLAVORS["8B"], "8B", "hf")
    assert "llama3 rope scaling off (flavor: on)" in caplog.text
    caplog.clear()
    check_hf_config(hf_config(TINY, torch.float32), TINY, "custom", "hf")
    check_hf_config({"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
                                                 "original_max_position_embeddings": 16}}, TINY, "custom", "hf")
    assert caplog.text == ""
    check_hf_config({**hf_config(TINY, torch.float32), "rope_theta": 500000.0}, TINY, "custom", "hf")
    assert "rope_theta 500000.0 (flavor: 10000.0)" in caplog.text


def test_empty_folder_and_corrupt_header(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no .*safetensors files"):
        convert_from_hf(tmp_path / "empty", tmp_path / "out", TINY)
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="model.safetensors is not a valid safetensors file: not JSON"):
        convert_from_hf(tmp_path / "corrupt", tmp_path / "out", TINY)
    with pytest.raises(CheckpointError, match="is not a folder"):
        convert_from_hf(tmp_path / "nowhere", tmp_path / "out", TINY)
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_and_left_untouched(tiny_hf, tmp_path):
    _, folder = tiny_hf
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    before = (out / "precious.txt").stat().st_mtime_ns
    for attempt in (lambda: convert_from_hf(folder, out, TINY), lambda: convert_to_hf(out, out, TINY)):
        with pytest.raises(CheckpointError, match="already exists and is not empty"):
            attempt()
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "keep me" and (out / "precious.txt").stat().st_mtime_ns == before
    # An existing empty folder is fine: it becomes the output.
    (tmp_path / "empty").mkdir()
    convert_from_hf(folder, tmp_path / "empty", TINY, progress=False)
    assert (tmp_path / "empty" / ".metadata").is_file()


def test_from_hf_resolves_each_tensor_just_before_writing_it_even_with_cuda(tiny_hf, tmp_path, monkeypatch):
    # With CUDA, DCP's default writer resolves items ahead of writing them; the planner frees each
    # tensor when the next is resolved, so the converter must not get that writer (on this CPU-only
    # torch, the overlapping loader would fail outright).
    _, folder = tiny_hf
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    convert_from_hf(folder, tmp_path / "dcp", TINY, progress=False)
    monkeypatch.undo()
    expected = {from_hf_key(k): from_hf_tensor(from_hf_key(k), t, TINY) for k, t in hf_tensors(folder).items()}
    assert_bit_identical(expected, dcp_tensors(tmp_path / "dcp"))


def test_failure_midway_leaves_no_output(tiny_hf, tmp_path, monkeypatch):
    _, folder = tiny_hf
    real, calls = convert.SafetensorsReader.read, []

    def flaky(self, key):
        calls.append(key)
        if len(calls) == 5:
            raise OSError("disk went away")
        return real(self, key)

    monkeypatch.setattr(convert.SafetensorsReader, "read", flaky)
    with pytest.raises(CheckpointError, match="OSError: disk went away"):
        convert_from_hf(folder, tmp_path / "out", TINY, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither out nor .out.partial


def test_bad_dcp_inputs(tmp_path, flavors):
    torch.manual_seed(0)
    save_dcp({k: torch.randn(v.shape) for k, v in Transformer(TINY).state_dict().items()}, tmp_path / "ckpt/step-3")
    with pytest.raises(CheckpointError, match="has no .metadata.*it holds step-3: point at one of them"):
        convert_to_hf(tmp_path / "ckpt", tmp_path / "out", TINY)
    with pytest.raises(CheckpointError, match="'layers.0.attention.wk.weight' has shape \\[32, 64\\] but the Llama 3 "
                                              "custom model needs \\[64, 64\\]"):
        convert_to_hf(tmp_path / "ckpt/step-3", tmp_path / "out", ModelArgs(**{**TINY.__dict__, "n_kv_heads": 4}))
    with pytest.raises(CheckpointError, match="'layers.1.attention.wk.weight' has no place in a Llama 3 custom model"):
        convert_to_hf(tmp_path / "ckpt/step-3", tmp_path / "out", ModelArgs(**{**TINY.__dict__, "n_layers": 1}))
    with pytest.raises(CheckpointError, match="'layers.2.attention.wq.weight' is missing"):
        convert_to_hf(tmp_path / "ckpt/step-3", tmp_path / "out", ModelArgs(**{**TINY.__dict__, "n_layers": 3}))
    with pytest.raises(CheckpointError, match="--hf_assets_path=.* is not a folder"):
        convert_to_hf(tmp_path / "ckpt/step-3", tmp_path / "out", TINY, hf_assets_path=tmp_path / "nope")
    with pytest.raises(ConfigError, match="'13B' is not a Llama 3 flavor"):
        convert_to_hf(tmp_path / "ckpt/step-3", tmp_path / "out", "13B")
    assert not (tmp_path / "out").exists()
