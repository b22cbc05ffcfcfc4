"""Damaged and crafted Hugging Face folders, on both ways in: ``convert_from_hf`` and ``initial_load_in_hf``.

Every case must give one ``error:`` line and exit 1, never a traceback, an endless wait on a FIFO,
or a read outside the folder; the same check guards both ways in. Exports must copy only regular
tokenizer files and say when they have none. Real FIFOs and symlinks throughout.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from savepoint.hf.llama3 import hf_config, to_hf_key, to_hf_tensor
from savepoint.models.llama3 import LLAMA3_FLAVORS, build_model
from tests.conftest import FAST_ARGS, ROOT
from tests.conftest import run_cli as run

DEBUG = LLAMA3_FLAVORS["debugmodel"]
CONFIG = ROOT / "configs" / "debug_model.toml"


# ---- helpers ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    """A debugmodel's weights under HF names (q/k permuted), float32."""
    model = build_model(DEBUG.with_max_seq_len(32), seed=0)
    return {to_hf_key(k): to_hf_tensor(k, v.detach(), DEBUG) for k, v in model.state_dict().items()}


def hf_folder(path: Path, weights: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    path.mkdir(parents=True)
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config or hf_config(DEBUG, torch.float32)))
    return path


def from_hf(folder: Path, tmp_path: Path) -> list[str]:
    return ["convert", "from_hf", str(folder), str(tmp_path / "dcp"), "--model_flavor", "debugmodel"]


def initial_load(folder: Path, tmp_path: Path) -> list[str]:
    return ["train", "--job.config_file", str(CONFIG), "--job.dump_folder", str(tmp_path / "run"), *FAST_ARGS,
            "--training.steps", "1", "--checkpoint.initial_load_in_hf", "--checkpoint.initial_load_path", str(folder)]


WAYS_IN = {"convert_from_hf": from_hf, "initial_load_in_hf": initial_load}


def one_error(capsys, argv: list[str], *words: str) -> str:
    code, _, err = run(argv, capsys)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    assert code == 1
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def unblock_fifo():
    """``unblock_fifo(path)``: if something is still blocked opening the FIFO after 20 s, let it go (EOF).

    A reader that opens a FIFO blocks until a writer appears; without this, a regression would hang the
    suite instead of failing it. Opening the write end non-blocking fails (ENXIO) when nobody reads.
    """
    timers = []

    def arm(path: Path) -> None:
        def release() -> None:
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        timer = threading.Timer(20, release)
        timer.daemon = True
        timer.start()
        timers.append(timer)

    yield arm
    for timer in timers:
        timer.cancel()


# ---- config.json ----------------------------------------------------------------------------------


def _config(**edit) -> Callable[[], str]:
    def text() -> str:
        config = hf_config(DEBUG, torch.float32)
        for key, value in edit.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        return json.dumps(config)
    return text


BAD_CONFIGS = {
    "not JSON": (lambda: "{not json", ["config.json", "not JSON"]),
    "a list": (lambda: "[1, 2]", ["config.json", "JSON list, not an object"]),
    "nested deeply": (lambda: "[" * 100_000 + "]" * 100_000, ["config.json", "nests too deeply"]),
    "rope_theta a string": (_config(rope_theta="big", rope_scaling={"rope_type": "llama3", "factor": 8.0}),
                            ["config.json", "rope_theta='big'", "must be a positive number"]),
    "hidden_size a string": (_config(hidden_size="256", head_dim=None),
                             ["config.json", "hidden_size='256'", "must be a positive integer"]),
    "head count a bool": (_config(num_attention_heads=True), ["num_attention_heads=True", "positive integer"]),
    "rope_scaling a list": (_config(rope_scaling=[8.0]), ["rope_scaling=[8.0]", "must be an object"]),
}


@pytest.mark.parametrize("way", list(WAYS_IN))
@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_json_is_one_line(weights, tmp_path, capsys, way, case):
    text, words = BAD_CONFIGS[case]
    folder = hf_folder(tmp_path / "hf", weights)
    (folder / "config.json").write_text(text())
    one_error(capsys, WAYS_IN[way](folder, tmp_path), str(folder), *words)
    assert not (tmp_path / "dcp").exists()


@pytest.mark.parametrize("way", list(WAYS_IN))
def test_other_head_counts_with_fitting_shapes_are_refused(weights, tmp_path, capsys, way):
    # 8 heads of 32 instead of 16 of 16 (kv: 4 of 32 instead of 8 of 16): every shape fits, the q/k permutation not.
    config = {**hf_config(DEBUG, torch.float32), "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32}
    folder = hf_folder(tmp_path / "hf", weights, config)
    one_error(capsys, WAYS_IN[way](folder, tmp_path), "num_attention_heads=8", "debugmodel model has 16",
              "q/k would be permuted with the wrong head count")


# ---- weight files: FIFOs, links, files outside the folder -------------------------------------------


@pytest.mark.parametrize("way", list(WAYS_IN))
def test_fifo_weights_are_refused_without_blocking(weights, tmp_path, capsys, unblock_fifo, way):
    folder = hf_folder(tmp_path / "hf", weights)
    (folder / "model.safetensors").unlink()
    os.mkfifo(folder / "model.safetensors")
    unblock_fifo(folder / "model.safetensors")
    one_error(capsys, WAYS_IN[way](folder, tmp_path), f"{folder}/model.safetensors is a FIFO", "not a regular file")


def _index_to(folder: Path, name: str, keys) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(keys, name)}))


@pytest.mark.parametrize("way", list(WAYS_IN))
@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_index_entries_outside_the_folder_are_refused(weights, tmp_path, capsys, way, how):
    outside = hf_folder(tmp_path / "elsewhere", weights) / "model.safetensors"
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_config(DEBUG, torch.float32)))
    name = {"absolute": str(outside), "dotdot": "../elsewhere/model.safetensors", "symlink": "shard.safetensors"}[how]
    if how == "symlink":
        (folder / name).symlink_to(outside)
    _index_to(folder, name, weights)
    words = ["symbolic link", "not followed"] if how == "symlink" else [repr(name), "points outside the folder"]
    one_error(capsys, WAYS_IN[way](folder, tmp_path), *words)


@pytest.mark.parametrize("way", list(WAYS_IN))
def test_symlinked_weights_file_is_refused(weights, tmp_path, capsys, way):
    real = hf_folder(tmp_path / "real", weights) / "model.safetensors"
    folder = hf_folder(tmp_path / "hf", weights)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(real)
    one_error(capsys, WAYS_IN[way](folder, tmp_path), f"{folder}/model.safetensors is a symbolic link",
              "cp -rL", "--local-dir")


def hub_snapshot(root: Path, weights: dict[str, torch.Tensor]) -> Path:
    """A Hugging Face cache repo as huggingface_hub lays it out: snapshots/<rev>/<name> -> ../../blobs/<hash>."""
    real = hf_folder(root / "download", weights)
    (real / "tokenizer.json").write_text('{"version": "1.0"}\n')
    blobs, snapshot = root / "models--x--y" / "blobs", root / "models--x--y" / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, path in enumerate(sorted(real.iterdir())):
        blob = blobs / f"{i:040x}"
        path.rename(blob)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


@pytest.mark.parametrize("way", list(WAYS_IN))
def test_hugging_face_cache_snapshot_loads(weights, tmp_path, capsys, way):
    snapshot = hub_snapshot(tmp_path, weights)
    code, _, err = run(WAYS_IN[way](snapshot, tmp_path), capsys)
    assert code == 0, err


def test_hugging_face_cache_links_leaving_blobs_are_refused(weights, tmp_path, capsys):
    snapshot = hub_snapshot(tmp_path, weights)
    outside = hf_folder(tmp_path / "elsewhere", weights) / "model.safetensors"
    (snapshot / "model.safetensors").unlink()
    (snapshot / "model.safetensors").symlink_to(outside)
    one_error(capsys, from_hf(snapshot, tmp_path), f"{snapshot}/model.safetensors is a symbolic link", "blobs/")


def test_export_copies_tokenizer_from_a_hugging_face_cache_snapshot(weights, step, tmp_path, capsys):
    snapshot = hub_snapshot(tmp_path, weights)
    out = tmp_path / "export"
    code, _, err = run(["convert", "to_hf", str(step), str(out), "--model_flavor", "debugmodel",
                        "--hf_assets_path", str(snapshot)], capsys)
    assert code == 0, err
    copied = out / "tokenizer.json"
    assert not copied.is_symlink() and copied.read_text() == '{"version": "1.0"}\n'


def test_header_length_past_the_file_is_refused_before_reading(tmp_path, capsys):
    folder = tmp_path / "hf"
    folder.mkdir()
    with open(folder / "model.safetensors", "wb") as f:
        f.write((1 << 60).to_bytes(8, "little") + b"{}")
    one_error(capsys, from_hf(folder, tmp_path), "model.safetensors is not a readable safetensors file",
              "header claims 1,152,921,504,606,846,976 bytes")


def test_tensor_offsets_past_the_data_are_refused(weights, tmp_path, capsys):
    folder = hf_folder(tmp_path / "hf", weights)
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    header["model.norm.weight"]["data_offsets"][1] += 1 << 40
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + length:])
    one_error(capsys, from_hf(folder, tmp_path), "'model.norm.weight' has data_offsets", "outside the file")


# ---- values: NaN/inf, integer and bool weights ---------------------------------------------------


@pytest.mark.parametrize("way", list(WAYS_IN))
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weights_are_refused_naming_the_tensor(weights, tmp_path, capsys, way, value):
    bad = dict(weights)
    bad["model.layers.3.mlp.down_proj.weight"] = weights["model.layers.3.mlp.down_proj.weight"].clone()
    bad["model.layers.3.mlp.down_proj.weight"][1, 2] = value
    folder = hf_folder(tmp_path / "hf", bad)
    one_error(capsys, WAYS_IN[way](folder, tmp_path), f"{folder}/model.safetensors",
              "'model.layers.3.mlp.down_proj.weight' holds 1 non-finite values (NaN or inf)")
    assert not (tmp_path / "dcp").exists()


@pytest.mark.parametrize("way", list(WAYS_IN))
@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_integer_and_bool_weights_are_refused(weights, tmp_path, capsys, way, dtype):
    bad = {**weights, "model.norm.weight": torch.ones(DEBUG.dim, dtype=dtype)}
    folder = hf_folder(tmp_path / "hf", bad)
    one_error(capsys, WAYS_IN[way](folder, tmp_path), "'model.norm.weight' is stored as", str(dtype),
              "floating point")


# ---- exports: tokenizer assets ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def step(tmp_path_factory) -> Path:
    """A model-only debugmodel DCP step with a manifest, as the trainer writes it."""
    import torch.distributed.checkpoint as dcp

    folder = tmp_path_factory.mktemp("step") / "step-3"
    dcp.save(build_model(DEBUG.with_max_seq_len(32), seed=1).state_dict(), checkpoint_id=str(folder), no_dist=True)
    return folder


def assets(path: Path) -> Path:
    path.mkdir()
    (path / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    (path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return path


SECRETS = {"a secret file": lambda tmp: _secret(tmp), "/proc/self/environ": lambda tmp: Path("/proc/self/environ")}


def _secret(tmp: Path) -> Path:
    (tmp / "secret").write_text("password=hunter2\n")
    return tmp / "secret"


@pytest.mark.parametrize("target", list(SECRETS))
def test_convert_to_hf_refuses_symlinked_tokenizer_files(step, tmp_path, capsys, target):
    folder = assets(tmp_path / "assets")
    (folder / "tokenizer.json").symlink_to(SECRETS[target](tmp_path))
    one_error(capsys, ["convert", "to_hf", str(step), str(tmp_path / "hf"), "--model_flavor", "debugmodel",
                       "--hf_assets_path", str(folder)],
              f"--hf_assets_path: {folder}/tokenizer.json is a symbolic link", "cp -L")
    assert not (tmp_path / "hf").exists()


def test_convert_to_hf_refuses_a_fifo_tokenizer_file(step, tmp_path, capsys, unblock_fifo):
    folder = assets(tmp_path / "assets")
    os.mkfifo(folder / "tokenizer.json")
    unblock_fifo(folder / "tokenizer.json")
    one_error(capsys, ["convert", "to_hf", str(step), str(tmp_path / "hf"), "--model_flavor", "debugmodel",
                       "--hf_assets_path", str(folder)], f"{folder}/tokenizer.json is a FIFO")
    assert not (tmp_path / "hf").exists()


def test_training_refuses_symlinked_tokenizer_files_before_step_1(tmp_path, capsys):
    folder = assets(tmp_path / "assets")
    (folder / "tokenizer.json").symlink_to(_secret(tmp_path))
    one_error(capsys, ["train", "--job.config_file", str(CONFIG), "--job.dump_folder", str(tmp_path / "run"),
                       *FAST_ARGS, "--training.steps", "6", "--checkpoint.last_save_model_only",
                       "--checkpoint.last_save_in_hf", "--model.hf_assets_path", str(folder)],
              f"--model.hf_assets_path: {folder}/tokenizer.json is a symbolic link")
    assert not (tmp_path / "run" / "checkpoint").exists()  # nothing trained, nothing saved
