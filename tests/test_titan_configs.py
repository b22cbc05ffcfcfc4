"""TorchTitan v0.2.2's own config files and key set load here: every key known, with its type and default.

The four stock llama3 TOML files are copied into tests/assets/torchtitan_configs (their headers say
from where). Keys savepoint does not run yet fail with one 'not supported yet' line each; the debug
config trains as it is through ./run_train.sh.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from savepoint.config.options import options
from savepoint.errors import ConfigError
from savepoint.job import parse_args
from tests.conftest import ROOT, losses

TITAN = ROOT / "tests/assets/torchtitan_configs"
# Defaults savepoint keeps on purpose (docs/coming-from-torchtitan.md says why).
OWN_DEFAULTS = {
    "model.hf_assets_path": None,
    "optimizer.implementation": "foreach",
    "training.dataset": "pydocs",
}
# What each stock file sets that savepoint does not run yet: the start of each refusal line.
REFUSED = {
    "debug_model.toml": [],
    "llama3_8b.toml": ["--profiling.enable_profiling=true: the torch profiler is not supported yet; "],
    "llama3_70b.toml": ["--profiling.enable_profiling=true: the torch profiler is not supported yet; "],
    "llama3_405b.toml": [
        "--profiling.enable_profiling=true: the torch profiler is not supported yet; ",
        "--model.converters=float8: converting the model (float8, mx) is not supported yet; ",
        "--parallelism.enable_async_tensor_parallel=true: async tensor parallelism is not supported yet; ",
    ],
}


def titan_keys() -> list[dict]:
    return json.loads((TITAN / "job_config_keys.json").read_text())["keys"]


def test_every_torchtitan_key_is_known_with_its_default() -> None:
    opts = options()
    keys = titan_keys()
    assert len(keys) == 149
    for entry in keys:
        section, _, name = entry["key"].rpartition(".")
        assert name in opts.get(section, {}), entry["key"]
        default = opts[section][name].default
        assert default == OWN_DEFAULTS.get(entry["key"], entry["default"]), entry["key"]


def test_every_torchtitan_key_set_to_its_default_loads(tmp_path: Path) -> None:
    """A TOML file naming every key of TorchTitan's config, each at TorchTitan's default, parses."""
    lines: list[str] = []
    tables: dict[str, list[str]] = {}
    for entry in titan_keys():
        section, _, name = entry["key"].rpartition(".")
        if entry["key"] in ("job.config_file",) or entry["default"] is None:
            continue  # a config file cannot name another; TOML has no null
        tables.setdefault(section, []).append(f"{name} = {json.dumps(entry['default'])}")
    for section, keys in tables.items():
        lines += [f"[{section}]", *keys, ""]
    path = tmp_path / "all_keys.toml"
    path.write_text("\n".join(lines))
    cfg = parse_args(["--job.config_file", str(path), "--training.dataset", "pydocs",
                      "--model.hf_assets_path", "none"], {})
    assert cfg.quantize.linear.mx.filter_fqns == ["output"]
    assert cfg.training.dataloader.num_workers == 0


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_stock_config_parses_and_refuses_only_what_is_not_supported(name: str) -> None:
    argv = ["--job.config_file", str(TITAN / name)]
    if not REFUSED[name]:
        cfg = parse_args(argv, {})
        assert cfg.training.seq_len == 2048 and cfg.quantize.linear.float8.filter_fqns == ["output"]
        return
    with pytest.raises(ConfigError) as info:
        parse_args(argv, {})
    problems = info.value.problems
    assert len(problems) == len(REFUSED[name]), problems
    for problem, start in zip(problems, REFUSED[name], strict=True):
        assert problem.startswith(start), problem
        assert "\n" not in problem


def test_refused_keys_pass_once_set_back(tmp_path: Path) -> None:
    cfg = parse_args(["--job.config_file", str(TITAN / "llama3_405b.toml"), "--profiling.no_enable_profiling",
                      "--model.converters", "", "--parallelism.no_enable_async_tensor_parallel"], {})
    assert (cfg.model.flavor, cfg.parallelism.tensor_parallel_degree) == ("405B", 8)
    assert cfg.quantize.linear.float8.enable_fsdp_float8_all_gather is True  # read only with a converter


# The file's 10 steps of 8 x 2048 tokens take minutes on a CI CPU; 2 steps run the same job.
STEPS = ["--training.steps", "2"]
MISSING = [p for p in ("tests/assets/tokenizer/tokenizer.json", "savepoint/data/assets/c4_test")
           if not (ROOT / p).exists()]


def test_debug_config_trains_as_is_through_run_train(tmp_path: Path) -> None:
    if MISSING:
        pytest.skip(f"the debug config's assets are not in the repository yet: {', '.join(MISSING)}")
    env = {"OMP_NUM_THREADS": "1", **os.environ, "SAVEPOINT_PYTHON": sys.executable, "NGPU": "1",
           "CONFIG_FILE": "tests/assets/torchtitan_configs/debug_model.toml"}
    dump = tmp_path / "outputs"
    cmd = ["./run_train.sh", "--job.dump_folder", str(dump), *STEPS]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trained = losses(dump)
    assert sorted(trained) == [1, 2]
    assert all(loss > 0 for loss in trained.values())
    assert "activation checkpointing (selective)" in proc.stdout + proc.stderr  # the file's own setting
