"""The conversion scripts and `savepoint convert` as documented, N-rank inputs, the progress line, and
what transformers sees of an export (tokenizer assets, the recorded flavor)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from savepoint import convert
from savepoint.convert import Progress, convert_to_hf, main
from savepoint.hf.llama3 import (
    from_hf_key,
    from_hf_tensor,
)
from savepoint.models.llama3.args import ModelArgs
from savepoint.models.llama3.model import Transformer
from tests.conftest import ROOT
from tests.convert_support import (
    DEBUG,
    SCRIPTS,
    TINY,
    assert_bit_identical,
    assets_folder,
    hf_tensors,
    load_in_transformers,
    one_error_line,
    save_dcp,
    script,
)

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
