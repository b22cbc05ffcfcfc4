"""Shared by the conversion tests: tiny random HF Llama models and folders, tensor readers, the
scripts' runner. Their fixtures (``tiny_hf``, ``debug_hf``, ``flavors``) are in conftest.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from savepoint.checkpoint.planner import TiledSavePlanner
from savepoint.hf.llama3 import (
    hf_config,
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
