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


# The file's 10 steps of 8 x 2048 tokens take minutes on a CI CPU (half a minute each); one step runs
# the same job: its model, data, activation checkpointing, loss, backward pass and optimizer step.
STEPS = ["--training.steps", "1"]
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
    assert sorted(trained) == [1]
    assert all(loss > 0 for loss in trained.values())
    assert "activation checkpointing (selective)" in proc.stdout + proc.stderr  # the file's own setting


# --- nested sections, aliases, choices, refusals and hints ----------------------------------


def problems(*argv: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_args(list(argv), {})
    return info.value.problems


def test_nested_sections_in_toml_and_on_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "nested.toml"
    path.write_text('[quantize.linear.float8]\nfilter_fqns = ["output"]\nrecipe_name = "rowwise"\n'
                    '[quantize.grouped_mm.mx]\nfqns = "experts,shared"\n[training]\nsteps = 3\n'
                    "[training.dataloader]\nnum_workers = 0\n[validation.dataloader]\npin_memory = true\n")
    cfg = parse_args(["--job.config_file", str(path), "--quantize.linear.mx.filter-fqns", "a,b"], {})
    assert cfg.quantize.linear.float8.filter_fqns == ["output"]
    assert cfg.quantize.linear.float8.recipe_name == "rowwise"
    assert cfg.quantize.grouped_mm.mx.fqns == ["experts", "shared"]  # TorchTitan's list[str] | str
    assert cfg.quantize.linear.mx.filter_fqns == ["a", "b"]
    assert cfg.validation.dataloader.pin_memory is True and cfg.training.steps == 3
    from savepoint.config import config_to_toml

    again = tmp_path / "again.toml"
    again.write_text(config_to_toml(cfg))
    assert "[quantize.linear.float8]" in again.read_text()
    reread = parse_args(["--job.config_file", str(again)], {})
    reread.job.config_file = cfg.job.config_file
    assert reread == cfg


def test_nested_section_errors_name_the_table(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[training.dataloaderx]\nnum_workers = 0\n[quantize.linear.float8]\nfilter = 1\n")
    table, key = problems("--job.config_file", str(path))
    assert "unknown section [training.dataloaderx]" in table and "did you mean [training.dataloader]?" in table
    assert "unknown key quantize.linear.float8.filter" in key and "filter_fqns" in key
    assert "[quantize] holds only the sections [quantize.linear.float8]" in problems("--quantize.linear", "x")[0]


def test_debug_seed_is_the_seed_and_training_seed_its_alias() -> None:
    cfg = parse_args(["--debug.seed", "7"], {})
    assert (cfg.training.seed, cfg.debug.seed) == (7, 7)  # the trainer reads training.seed
    cfg = parse_args(["--training.seed", "9"], {})
    assert (cfg.training.seed, cfg.debug.seed) == (9, 9)
    assert parse_args(["--debug.seed", "4", "--training.seed", "4"], {}).training.seed == 4
    cfg = parse_args(["--debug.deterministic"], {})
    assert cfg.training.deterministic is True and cfg.debug.deterministic is True
    assert parse_args([], {}).debug.seed is None


def test_debug_and_training_spellings_set_differently_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "seed.toml"
    path.write_text("[debug]\nseed = 5\n")
    (line,) = problems("--job.config_file", str(path), "--training.seed", "3")
    assert line.startswith("--debug.seed=5 and --training.seed=3 disagree") and "set only --debug.seed" in line
    (line,) = problems("--debug.deterministic", "--training.no_deterministic")
    assert line.startswith("--debug.deterministic=true and --training.deterministic=false disagree")
    (line,) = problems("--debug.seed", "-1")
    assert line.startswith("--debug.seed must be between 0 and 4294967295")


@pytest.mark.parametrize("argv, choices", [
    (["--comm.mode", "fake"], "default, fake_backend, local_tensor"),
    (["--training.dtype", "fp16"], "bfloat16, float32"),
    (["--activation_checkpoint.mode", "partial"], "selective, full, memory_budget, none"),
    (["--quantize.linear.float8.recipe_name", "colwise"], "tensorwise, rowwise, rowwise_with_gw_hp"),
    (["--parallelism.fsdp_reshard_after_forward", "sometimes"], "default, always, never"),
], ids=lambda v: v[0] if isinstance(v, list) else "")
def test_literal_keys_name_their_choices(argv: list[str], choices: str) -> None:
    (line,) = problems(*argv)
    assert line.startswith(f"{argv[0]}='{argv[1]}' is not one of {choices}")


@pytest.mark.parametrize("argv, start", [
    (["--training.dtype", "bfloat16"], "--training.dtype=bfloat16: training in bfloat16 is not supported yet; "),
    (["--training.dataloader.num_workers", "2"], "--training.dataloader.num_workers=2: data-loading worker"),
    (["--validation.enable"], "--validation.enable=true: validation during training is not supported yet; "),
    (["--comm.train_timeout_seconds", "30"], "--comm.train_timeout_seconds=30: a separate timeout"),
    (["--activation_checkpoint.mode", "memory_budget"], "--activation_checkpoint.mode=memory_budget: "),
    (["--lr_scheduler.total_steps", "100"], "--lr_scheduler.total_steps=100: a schedule longer or shorter"),
    (["--job.save_config_file", "c.json"], "--job.save_config_file=c.json: writing the config to a file"),
], ids=lambda v: v[0] if isinstance(v, list) else "")
def test_unimplemented_keys_are_one_not_supported_line(argv: list[str], start: str) -> None:
    (line,) = problems(*argv)
    assert line.startswith(start) and "is not supported yet; " in line


def test_keys_read_only_by_refused_features_are_accepted() -> None:
    cfg = parse_args(["--comm.trace_buf_size", "0", "--training.gc_freq", "7", "--validation.freq", "3",
                      "--profiling.save_traces_folder", "t", "--quantize.linear.float8.emulate",
                      "--parallelism.context_parallel_rotate_method", "alltoall"], {})
    assert (cfg.comm.trace_buf_size, cfg.training.gc_freq, cfg.validation.freq) == (0, 7, 3)
    assert "use none" in problems("--parallelism.context_parallel_load_balancer", "")[0]
    assert "--validation.steps must be > 0, or -1" in problems("--validation.steps", "0")[0]


@pytest.mark.parametrize("argv, hint", [
    (["--activation_x.folder", "x"], "did you mean a key of [activation_checkpoint] (see --help)?"),
    (["--activation_x.mode", "full"], "did you mean --activation_checkpoint.mode?"),
    (["--training.enable"], "enable is a key of [checkpoint], [compile]"),
    (["--checkpoint.seq_len", "8"], "seq_len is a key of [training], [validation]"),
    (["--checkpoint.intervall", "8"], "did you mean --checkpoint.interval?"),
    (["--qwerty.zzz", "1"], None),
], ids=lambda v: v[0] if isinstance(v, list) else "")
def test_hints_only_when_close(argv: list[str], hint: str | None) -> None:
    (line,) = problems(*argv)
    assert "checkpoint.folder" not in line
    if hint is None:
        assert "did you mean" not in line
    else:
        assert hint in line


def test_torchtitan_keys_that_were_misread_are_known() -> None:
    assert parse_args(["--training.global_batch_size", "16"], {}).training.global_batch_size == 16
    assert parse_args(["--metrics.save_tb_folder", "tb2"], {}).metrics.save_tb_folder == "tb2"


@pytest.mark.parametrize("argv, start", [
    (["--activation_checkpoint.selective_ac_option", "0"], "--activation_checkpoint.selective_ac_option is '0'"),
    (["--activation_checkpoint.selective_ac_option", "ops"], "--activation_checkpoint.selective_ac_option is 'ops'"),
    (["--compile.components", "model,optimizer"], "--compile.components has 'optimizer'; use 'model' and/or 'loss'"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_activation_checkpoint_and_compile_values_fail_before_launch(argv: list[str], start: str) -> None:
    (line,) = problems(*argv)
    assert line.startswith(start)
    cfg = parse_args(["--activation_checkpoint.selective_ac_option", "3", "--compile.components", "loss"], {})
    assert cfg.activation_checkpoint.selective_ac_option == "3"


def test_help_lists_the_choices_of_literal_keys() -> None:
    from savepoint.config import help_text

    text = help_text()
    assert "--comm.mode default|fake_backend|local_tensor (default: default)" in text
    assert "--quantize.linear.float8.recipe_name tensorwise|rowwise|rowwise_with_gw_hp (default: none)" in text


def test_deprecated_tokenizer_path_points_to_hf_assets_path() -> None:
    (line,) = problems("--model.tokenizer_path", "./tok")
    assert line.startswith("--model.tokenizer_path=./tok: TorchTitan's deprecated tokenizer folder option is not "
                           "supported yet; use --model.hf_assets_path")
