"""Hugging Face folders under pipeline parallelism: the final save as an HF folder, and the initial load from one.

A PP run's export must be the folder a 1-process export of the same weights writes (byte for
byte) and load in transformers with our logits; an initial load at PP must give every stage the
weights a 1-process load gives. One torchrun launch (2 processes: PP 2) runs the 1F1B and
Interleaved1F1B scenarios of tests/pp_hf_worker.py, another (4 processes: PP 2 x FSDP 2) the
sharded ones; the tests compare what they wrote with 1-process references built here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from savepoint.checkpoint.hf_steps import HFSteps
from savepoint.checkpoint.states import ModelState
from savepoint.hf.llama3 import Llama3HFAdapter
from savepoint.models.llama3 import LLAMA3_FLAVORS, Transformer
from tests import pp_hf_worker as worker
from tests.conftest import ROOT, make_config

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytestmark = pytest.mark.distributed

DEBUG = LLAMA3_FLAVORS["debugmodel"]
TWO = ["export:1F1B", "export:Interleaved1F1B", "load:Interleaved1F1B"]
FOUR = ["export:Interleaved1F1B:fsdp:bf16", "load:1F1B:fsdp"]
EXPORTS = [s for s in TWO + FOUR if s.startswith("export")]


def torchrun(base: Path, source: Path, nproc: int, scenarios: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--rdzv_backend", "c10d",
           "--rdzv_endpoint", "localhost:0", str(ROOT / "tests" / "pp_hf_worker.py"), str(base), str(source),
           ",".join(scenarios)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"


@pytest.fixture(scope="module")
def two(tmp_path_factory, debug_hf) -> Path:
    base = tmp_path_factory.mktemp("pp_hf")
    torchrun(base, debug_hf, 2, TWO)
    return base


@pytest.fixture(scope="module")
def four(tmp_path_factory, debug_hf) -> Path:
    base = tmp_path_factory.mktemp("pp_hf_fsdp")
    torchrun(base, debug_hf, 4, FOUR)
    return base


@pytest.fixture
def run_of(request):
    """``run_of(scenario)``: its folder, from the launch that ran it (the 4-process one only when asked for)."""
    return lambda scenario: request.getfixturevalue("two" if scenario in TWO else "four") / \
        worker.scenario_name(scenario)


def savepoint_model(weights: dict[str, torch.Tensor]) -> Transformer:
    model = Transformer(DEBUG)
    model.load_state_dict(weights)
    return model.eval()


def hf_steps(tmp_path: Path, *overrides: str) -> HFSteps:
    cfg = make_config(tmp_path / "job", *worker.HF_FINAL, *overrides).checkpoint
    return HFSteps(cfg, Llama3HFAdapter(DEBUG, "debugmodel"), None)


def assert_identical(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(got) == sorted(expected), f"{what}: keys differ"
    bad = [k for k in expected if expected[k].dtype != got[k].dtype or not torch.equal(expected[k], got[k])]
    assert not bad, f"{what}: {len(bad)} tensors differ, e.g. {bad[:3]}"


def test_each_rank_held_only_its_stages(run_of):
    for scenario in EXPORTS:
        held = [set(keys) for keys in json.loads((run_of(scenario) / "held.json").read_text())]
        everything = set(Transformer(DEBUG).state_dict())
        first, last = (held[0], held[-1])
        assert "tok_embeddings.weight" in first and "output.weight" in last, scenario
        assert not first & last and first | last == everything, scenario
        if len(held) == 4:  # PP is the outer mesh dimension: ranks 0, 1 shard one stage, ranks 2, 3 the other
            assert held[0] == held[1] and held[2] == held[3], scenario


@pytest.mark.parametrize("scenario", EXPORTS)
def test_pp_export_is_the_one_process_export(run_of, tmp_path, scenario):
    """Byte for byte: the same files, tensors, order, shards, index and config as a 1-process export."""
    run = run_of(scenario)
    exported = run / "checkpoint" / "step-2"
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["kind"] == "hf"
    model = savepoint_model(torch.load(run / "weights.pt"))
    reference = tmp_path / "one_process"
    hf_steps(tmp_path, "--checkpoint.export_dtype", manifest["export_dtype"]).export(
        ModelState(model).state_dict())(reference)
    names = sorted(p.name for p in reference.iterdir())
    assert names == ["config.json", "model.safetensors", "model.safetensors.index.json"]
    assert sorted(p.name for p in exported.iterdir()) == sorted([*names, "manifest.json"])
    for name in names:
        assert (exported / name).read_bytes() == (reference / name).read_bytes(), name


@pytest.mark.parametrize("scenario", ["export:1F1B", "export:Interleaved1F1B"])
def test_pp_export_loads_in_transformers(run_of, scenario):
    run = run_of(scenario)
    ours = savepoint_model(torch.load(run / "weights.pt"))
    hf = transformers.LlamaForCausalLM.from_pretrained(str(run / "checkpoint" / "step-2"), local_files_only=True,
                                                       torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, DEBUG.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(tokens).logits - ours(tokens)).abs().max().item()
    assert diff < 1e-5, diff


@pytest.mark.parametrize("scenario", ["load:Interleaved1F1B", "load:1F1B:fsdp"])
def test_pp_initial_load_in_hf_is_the_one_process_load(run_of, tmp_path, debug_hf, scenario):
    model = Transformer(DEBUG)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hf_steps(tmp_path, "--checkpoint.initial_load_path", str(debug_hf)).load_initial(model)
    expected = ModelState(model).state_dict()
    assert all(not torch.equal(before[k], v) for k, v in expected.items())  # every tensor came from the folder
    assert_identical(expected, torch.load(run_of(scenario) / "weights.pt"), f"{scenario}: gathered from every stage")
