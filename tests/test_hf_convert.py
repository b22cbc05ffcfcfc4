"""Offline HF <-> DCP conversion (``savepoint/convert/`` and ``scripts/checkpoint_conversion``).

Tiny random ``LlamaForCausalLM`` folders (GQA) stand in for real downloads; logits are compared with
transformers' own forward, round trips bit by bit, and the real 8B/70B flavors on meta tensors.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorProperties, TensorStorageMetadata

from savepoint import convert
from savepoint.checkpoint.planner import TiledSavePlanner
from savepoint.convert import Progress, check_dcp_keys, convert_from_hf, convert_to_hf, main, partial_path
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
from tests.conftest import ROOT

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# GQA (4 query heads, 2 kv heads) and llama3 RoPE scaling that matters at these lengths.
TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32, max_seq_len=64,
                 rope_theta=10000.0, rope_original_max_pos=16, rope_scaling_factor=4.0)
DEBUG = LLAMA3_FLAVORS["debugmodel"]
SCRIPTS = ROOT / "scripts" / "checkpoint_conversion"
TOKENS = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))


# ---- helpers ---------------------------------------------------------------------------------------


def hf_model(args: ModelArgs, seed: int = 0):
    """A random fp32 ``LlamaForCausalLM`` for ``args``; every weight (norms too) differs from its init value."""
    cfg = {k: v for k, v in hf_config(args, torch.float32).items()
           if k not in ("architectures", "model_type", "torch_dtype")}
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg, attn_implementation="eager"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def our_model(step_dir: Path, args: ModelArgs) -> Transformer:
    model = Transformer(args)
    state = model.state_dict()
    dcp.load(state, checkpoint_id=str(step_dir), no_dist=True)
    model.load_state_dict(state)
    return model.eval()


def dcp_tensors(step_dir: Path) -> dict[str, torch.Tensor]:
    saved = FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata
    state = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in saved.items()
             if isinstance(v, TensorStorageMetadata)}
    dcp.load(state, checkpoint_id=str(step_dir), no_dist=True)
    return state


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k).clone() for k in f.keys()})
    return out


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), f"{key} differs"


def save_dcp(state: dict[str, torch.Tensor], step_dir: Path) -> None:
    """A model-only checkpoint as the trainer writes it: column tiles for wo and w2."""
    planner = TiledSavePlanner(tile_if=lambda k: k.endswith(("wo.weight", "w2.weight")), min_tile_bytes=1024)
    dcp.save(state, checkpoint_id=str(step_dir), planner=planner, no_dist=True)


def assets_folder(path: Path) -> Path:
    path.mkdir()
    (path / "tokenizer.json").write_text('{"version": "1.0"}\n')
    (path / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    (path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 3]}))
    return path


def script(name: str, *args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    """Run a conversion script exactly as the docs do, from another directory."""
    cmd = [sys.executable, str(SCRIPTS / name), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """(HF model, its saved folder) for TINY."""
    model = hf_model(TINY)
    folder = tmp_path_factory.mktemp("tiny") / "hf"
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def debug_hf(tmp_path_factory) -> Path:
    """An HF folder of the real ``debugmodel`` flavor (for the scripts, which only know real flavors)."""
    folder = tmp_path_factory.mktemp("debug") / "hf"
    hf_model(DEBUG, seed=1).save_pretrained(folder)
    return folder


@pytest.fixture
def flavors(monkeypatch):
    """Register extra flavors for the test: ``flavors(name=ModelArgs)``."""
    def add(**extra: ModelArgs) -> None:
        for name, args in extra.items():
            monkeypatch.setitem(LLAMA3_FLAVORS, name, args)
    return add


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
    assert files == ["config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json",
                     "tokenizer_config.json"]
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


# ---- the scripts, exactly as documented ------------------------------------------------------------


def test_scripts_round_trip_in_the_documented_form(debug_hf, tmp_path):
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    done = script("convert_from_hf.py", debug_hf, tmp_path / "initial_load_path", "--model_name", "llama3",
                  "--model_flavor", "debugmodel", cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    assert "-> DCP: 57/57 tensors" in done.stderr
    assets = assets_folder(tmp_path / "assets")
    done = script("convert_to_hf.py", tmp_path / "initial_load_path", tmp_path / "hf", "--hf_assets_path", assets,
                  "--model_name", "llama3", "--model_flavor", "debugmodel", "--export_dtype", "bfloat16",
                  cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    assert_bit_identical(hf_tensors(tmp_path / "hf"),
                         {k: v.to(torch.bfloat16) for k, v in hf_tensors(debug_hf).items()})
    assert (tmp_path / "hf" / "tokenizer_config.json").is_file()
    assert sorted(p.name for p in elsewhere.iterdir()) == []


def test_the_guides_example_path_and_a_python_without_savepoint(debug_hf, tmp_path):
    """The guide's example runs ``scripts/convert_from_hf.py``; a Python lacking savepoint gets one line."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_from_hf.py"), str(debug_hf),
                           str(tmp_path / "initial_load_path"), "--model_name", "llama3", "--model_flavor",
                           "debugmodel"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "-> DCP: 57/57 tensors" in done.stderr
    assert (tmp_path / "initial_load_path" / ".metadata").is_file()
    bare = subprocess.run([sys.executable, "-I", "-S", str(SCRIPTS / "convert_to_hf.py"), "a", "b"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert bare.returncode == 1
    assert bare.stderr.startswith("error: savepoint is not installed for ") and "pip install -e ." in bare.stderr


@pytest.mark.parametrize("args, words", [
    (["--model_name", "llama4"], ["argument --model_name: invalid choice: 'llama4'"]),
    (["--model_flavor", "8B"], ["'model.layers.6.self_attn.q_proj.weight'", "is missing", "8B"]),
])
def test_script_errors_are_one_line_and_exit_1(debug_hf, tmp_path, args, words):
    done = script("convert_from_hf.py", debug_hf, tmp_path / "out", *args, cwd=tmp_path)
    assert done.returncode == 1
    line = one_error_line(done.stderr)
    for word in words:
        assert word in line
    assert not (tmp_path / "out").exists()


def test_cli_entry_point_arguments(tiny_hf, tmp_path, flavors, capsys):
    flavors(tiny=TINY)
    _, folder = tiny_hf
    assert main(["from_hf", str(folder), str(tmp_path / "dcp"), "--model_flavor", "tiny"]) == 0
    assert main(["to_hf", str(tmp_path / "dcp"), str(tmp_path / "hf"), "--model_flavor", "tiny",
                 "--max_shard_size", "50KB"]) == 0
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
    assert main(["sideways", "a", "b"]) == 1
    assert "usage: savepoint convert" in capsys.readouterr().err
    assert main(["to_hf", "a", "b", "--max_shard_size", "lots"]) == 1
    assert "is not a size" in capsys.readouterr().err
    assert convert.parse_size("5GB") == 5 * 10**9 and convert.parse_size("4GiB") == 4 * 2**30
    assert main(["to_hf", str(tmp_path / "hf"), str(tmp_path / "x"), "--model_flavor", "tiny"]) == 1
    assert "it is a Hugging Face folder already" in capsys.readouterr().err


def test_savepoint_convert_command(tiny_hf, tmp_path, flavors, capsys):
    from savepoint import cli

    if "convert" not in cli.COMMANDS:
        pytest.skip("savepoint/cli.py has no convert command yet")
    flavors(tiny=TINY)
    _, folder = tiny_hf
    assert cli.main(["convert", "from_hf", str(folder), str(tmp_path / "dcp"), "--model_flavor", "tiny"]) == 0
    assert cli.main(["convert", "to_hf", str(tmp_path / "dcp"), str(tmp_path / "hf"), "--model_flavor", "tiny",
                     "--export_dtype", "bfloat16"]) == 0
    assert_bit_identical(hf_tensors(tmp_path / "hf"), {k: v.to(torch.bfloat16) for k, v in hf_tensors(folder).items()})
    assert cli.main(["convert", "from_hf", str(folder), str(tmp_path / "dcp"), "--model_flavor", "tiny"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: output folder")


# ---- N ranks, progress -----------------------------------------------------------------------------

WORKER = """
import sys, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from savepoint.checkpoint.planner import TiledSavePlanner
from savepoint.models.llama3.args import ModelArgs
from savepoint.models.llama3.model import Transformer
dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (2,))
torch.manual_seed(5)
args = ModelArgs(**eval(sys.argv[2]))
full = {k: torch.randn(v.shape) for k, v in Transformer(args).state_dict().items()}
# rows for most tensors (FSDP), columns for wo/w2 (TP), odd sizes split unevenly
state = {k: distribute_tensor(v, mesh, [Shard(1) if k.endswith(("wo.weight", "w2.weight")) else Shard(0)])
         for k, v in full.items()}
dcp.save(state, checkpoint_id=sys.argv[1] + "/step-2", planner=TiledSavePlanner(min_tile_bytes=1024))
if dist.get_rank() == 0:
    torch.save(full, sys.argv[1] + "/full.pt")
dist.destroy_process_group()
"""


@pytest.mark.distributed
def test_two_rank_sharded_and_tiled_checkpoint(tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    args = {**TINY.__dict__, "vocab_size": 301}  # an odd row count: uneven shards
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv_backend", "c10d",
           "--rdzv_endpoint", "localhost:0", str(tmp_path / "worker.py"), str(tmp_path), repr(args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert len(list((tmp_path / "step-2").glob("*.distcp"))) == 2
    chunks = FileSystemReader(str(tmp_path / "step-2")).read_metadata().state_dict_metadata
    assert len(chunks["layers.0.attention.wo.weight"].chunks) > 2  # column shards, then tiles
    flavor = ModelArgs(**args)
    convert_to_hf(tmp_path / "step-2", tmp_path / "hf", flavor, progress=False)
    got = {from_hf_key(k): from_hf_tensor(from_hf_key(k), t, flavor) for k, t in hf_tensors(tmp_path / "hf").items()}
    assert_bit_identical(torch.load(tmp_path / "full.pt"), got)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_one_updating_line():
    tty = _Tty()
    bar = Progress("x", 3, 3_000_000, stream=tty, interval=0)
    for _ in range(3):
        bar.update(1_000_000)
    bar.close()
    text = tty.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n") and text.count("\r") == 4
    assert "x: 3/3 tensors, 3.0/3.0 MB" in text.splitlines()[-1].split("\r")[-1]
    plain = io.StringIO()
    bar = Progress("x", 2, 10, stream=plain)
    bar.update(5)
    bar.update(5)
    bar.close()
    assert plain.getvalue().count("\n") == 1 and "\r" not in plain.getvalue()


# ---- exports: what transformers sees, tokenizer assets, the recorded flavor -------------------------


def load_in_transformers(folder: Path):
    """(model, every warning transformers logged or raised while loading ``folder``)."""
    import logging
    import warnings

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
    finally:
        hf_logger.removeHandler(handler)
    return model, [r.getMessage() for r in records] + [str(w.message) for w in caught]


def test_export_without_assets_warns_and_loads_silently_in_transformers(train, tmp_path, caplog):
    trainer = train(stop_after=5)
    step = tmp_path / "run" / "checkpoint" / "step-5"
    caplog.clear()
    convert_to_hf(step, tmp_path / "hf", progress=False)  # the flavor comes from the step's manifest
    assert "--hf_assets_path is not set: the Hugging Face export will have no tokenizer files" in caplog.text
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["max_position_embeddings"] > config["rope_scaling"]["original_max_position_embeddings"]
    hf, warned = load_in_transformers(tmp_path / "hf")
    assert warned == []
    tokens = torch.randint(0, DEBUG.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))  # seq_len 32
    with torch.no_grad():
        diff = (hf(tokens).logits - trainer.model.eval()(tokens)).abs().max().item()
    assert diff < 1e-5, diff


def test_export_with_an_empty_assets_folder_warns(tmp_path, caplog):
    save_dcp({k: torch.randn(v.shape) for k, v in Transformer(TINY).state_dict().items()}, tmp_path / "step-1")
    (tmp_path / "assets").mkdir()
    convert_to_hf(tmp_path / "step-1", tmp_path / "hf", TINY, hf_assets_path=tmp_path / "assets", progress=False)
    assert f"--hf_assets_path={tmp_path / 'assets'} holds no tokenizer files" in caplog.text


def test_to_hf_takes_the_flavor_the_manifest_records(train, tmp_path, capsys):
    train(stop_after=5)
    step = tmp_path / "run" / "checkpoint" / "step-5"
    assert main(["to_hf", str(step), str(tmp_path / "hf")]) == 0
    assert "as Llama 3 debugmodel (as its manifest.json records" in capsys.readouterr().out
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["hidden_size"] == DEBUG.dim
    assert main(["to_hf", str(step), str(tmp_path / "hf2"), "--model_flavor", "debugmodel"]) == 0
    capsys.readouterr()
    assert main(["to_hf", str(step), str(tmp_path / "hf3"), "--model_flavor", "8B"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "--model_flavor 8B does not match" in line and "trained with flavor debugmodel" in line
    assert "drop --model_flavor" in line and not (tmp_path / "hf3").exists()
