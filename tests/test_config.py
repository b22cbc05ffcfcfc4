"""Config loading: TOML + CLI precedence, flag grammar, error reporting, help and export."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from savepoint.config import (
    JobConfig,
    config_to_dict,
    config_to_toml,
    help_text,
    validate,
    wants_help,
)
from savepoint.config.manager import field_docs
from savepoint.errors import ConfigError
from savepoint.job import parse_args

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NO_ENV: dict[str, str] = {}


def write(tmp_path: Path, text: str, name: str = "job.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def parse(*argv: str) -> JobConfig:
    return parse_args(list(argv), NO_ENV)


def problems_of(argv: list[str], environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_args(argv, NO_ENV if environ is None else environ)
    for problem in info.value.problems:
        assert problem in str(info.value)
    return info.value.problems


def only_problem(argv: list[str]) -> str:
    problems = problems_of(argv)
    assert len(problems) == 1, problems
    return problems[0]


# --- shipped configs and defaults ------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_parse_and_validate(path: Path) -> None:
    cfg = parse("--job.config_file", str(path))
    assert cfg.job.config_file == str(path)
    assert validate(cfg) == []


def test_shipped_configs_exist() -> None:
    names = {p.name for p in CONFIGS.glob("*.toml")}
    assert {"debug_model.toml", "llama3_8b.toml"} <= names
    debug = parse("--job.config_file", str(CONFIGS / "debug_model.toml"))
    assert debug.model.flavor == "debugmodel"
    assert (debug.training.seq_len, debug.training.steps) == (128, 10)
    big = parse("--job.config_file", str(CONFIGS / "llama3_8b.toml"))
    assert (big.model.flavor, big.checkpoint.export_dtype) == ("8B", "bfloat16")
    assert big.checkpoint.interval == 500
    assert big.model.hf_assets_path == "./assets/hf/Llama-3.1-8B"


def test_no_args_gives_defaults() -> None:
    assert parse() == JobConfig()


# --- precedence and grammar ------------------------------------------------------------------


def test_precedence_cli_over_toml_over_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "[checkpoint]\ninterval = 7\nkeep_latest_k = 3\n[training]\nsteps = 50")
    cfg = parse("--job.config_file", path, "--checkpoint.interval", "9")
    assert cfg.checkpoint.interval == 9  # CLI
    assert cfg.checkpoint.keep_latest_k == 3  # TOML
    assert cfg.training.steps == 50  # TOML
    assert cfg.checkpoint.folder == "checkpoint"  # default


def test_equals_and_space_forms(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    a = parse(f"--job.config_file={path}", "--checkpoint.interval=3", "--optimizer.lr=1e-3")
    b = parse("--job.config_file", path, "--checkpoint.interval", "3", "--optimizer.lr", "1e-3")
    assert a == b
    assert a.checkpoint.interval == 3 and a.optimizer.lr == 1e-3
    assert parse("--checkpoint.load_step", "-1").checkpoint.load_step == -1


def test_bool_flags_negation_and_hyphens(tmp_path: Path) -> None:
    assert parse("--checkpoint.enable").checkpoint.enable is True
    path = write(tmp_path, "[checkpoint]\nenable = true\n")
    assert parse("--job.config_file", path, "--checkpoint.no_enable").checkpoint.enable is False
    assert parse("--job.config_file", path, "--checkpoint.no-enable").checkpoint.enable is False
    cfg = parse("--checkpoint.keep-latest-k", "3", "--checkpoint.no-last-save-model-only")
    assert cfg.checkpoint.keep_latest_k == 3 and cfg.checkpoint.last_save_model_only is False


def test_bool_given_a_value_is_rejected() -> None:
    for argv in (["--checkpoint.enable", "True"], ["--checkpoint.enable=false"]):
        problem = only_problem(argv)
        assert "--checkpoint.enable" in problem and "--checkpoint.no_enable" in problem


def test_list_takes_one_comma_separated_token(tmp_path: Path) -> None:
    cfg = parse("--checkpoint.exclude_from_loading", "optimizer,lr_scheduler")
    assert cfg.checkpoint.exclude_from_loading == ["optimizer", "lr_scheduler"]
    path = write(tmp_path, '[checkpoint]\nexclude_from_loading = ["optimizer"]\n')
    cfg = parse("--job.config_file", path, "--checkpoint.exclude_from_loading", "")
    assert cfg.checkpoint.exclude_from_loading == []


def test_none_for_optional_fields() -> None:
    cfg = parse("--lr_scheduler.decay_ratio", "0.5", "--model.hf_assets_path", "x")
    assert (cfg.lr_scheduler.decay_ratio, cfg.model.hf_assets_path) == (0.5, "x")
    cfg = parse("--lr_scheduler.decay_ratio", "none", "--model.hf_assets_path=None")
    assert (cfg.lr_scheduler.decay_ratio, cfg.model.hf_assets_path) == (None, None)


def test_toml_float_field_accepts_int(tmp_path: Path) -> None:
    path = write(tmp_path, "[training]\nmax_norm = 2\n")
    cfg = parse("--job.config_file", path)
    assert cfg.training.max_norm == 2.0 and isinstance(cfg.training.max_norm, float)


def test_config_file_env(tmp_path: Path) -> None:
    env_file = write(tmp_path, "[training]\nsteps = 11\n", "env.toml")
    cli_file = write(tmp_path, "[training]\nsteps = 22\n", "cli.toml")
    assert parse_args([], {"CONFIG_FILE": env_file}).training.steps == 11
    assert parse_args([], {"CONFIG_FILE": env_file}).job.config_file == env_file
    both = parse_args(["--job.config_file", cli_file], {"CONFIG_FILE": env_file})
    assert both.training.steps == 22
    assert parse_args([], {"CONFIG_FILE": ""}) == JobConfig()


def test_wants_help() -> None:
    assert wants_help(["--help"]) and wants_help(["--checkpoint.enable", "-h"])
    assert not wants_help(["--checkpoint.enable"])


# --- errors that name the key ----------------------------------------------------------------


def test_unknown_cli_key_suggests_close_match() -> None:
    problem = only_problem(["--checkpoint.intervall", "5"])
    assert "--checkpoint.intervall" in problem
    assert "did you mean --checkpoint.interval?" in problem


def test_unknown_toml_key_suggests_close_match(tmp_path: Path) -> None:
    path = write(tmp_path, "[checkpoint]\nintervall = 5\n")
    problem = only_problem(["--job.config_file", path])
    assert f"checkpoint.intervall in {path}" in problem
    assert "did you mean checkpoint.interval?" in problem


def test_key_in_wrong_section_suggests_the_right_one() -> None:
    problem = only_problem(["--training.warmup_steps", "3"])
    assert "did you mean --lr_scheduler.warmup_steps?" in problem


def test_unknown_section(tmp_path: Path) -> None:
    path = write(tmp_path, "[chekpoint]\nenable = true\n")
    problem = only_problem(["--job.config_file", path])
    assert "chekpoint" in problem and "did you mean [checkpoint]?" in problem
    problem = only_problem(["--chekpoint.enable"])
    assert "--chekpoint.enable" in problem and "did you mean --checkpoint.enable?" in problem


def test_wrong_type_in_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "[checkpoint]\ninterval = 'ten'\nenable = 'true'\n")
    interval, enable = problems_of(["--job.config_file", path])
    assert "checkpoint.interval" in interval and "expected int" in interval
    assert "str 'ten'" in interval
    assert "checkpoint.enable" in enable and "expected bool" in enable
    path = write(tmp_path, "[checkpoint]\ninterval = 2.5\n", "float.toml")
    assert "expected int" in only_problem(["--job.config_file", path])


def test_wrong_type_on_cli() -> None:
    problem = only_problem(["--checkpoint.interval", "ten"])
    assert "--checkpoint.interval" in problem and "expected int" in problem and "'ten'" in problem
    assert "--optimizer.lr" in only_problem(["--optimizer.lr=fast"])
    assert "--checkpoint.interval" in only_problem(["--checkpoint.interval=1.5"])


def test_missing_value_and_stray_argument() -> None:
    problem = only_problem(["--checkpoint.interval"])
    assert "--checkpoint.interval" in problem and "needs a value" in problem
    assert "'stray'" in only_problem(["stray"])


@pytest.mark.parametrize(
    "argv",
    [
        ["--checkpoint.export_dtype", "bf16"],
        ["--checkpoint.async_mode", "sometimes"],
        ["--checkpoint.interval", "0"],
        ["--checkpoint.keep_latest_k", "-1"],
        ["--checkpoint.load_step", "-2"],
        ["--checkpoint.folder", " "],
        ["--checkpoint.exclude_from_loading", "optimzer"],
        ["--checkpoint.last_save_in_hf", "--checkpoint.no_last_save_model_only"],
        ["--checkpoint.initial_load_in_hf", "--checkpoint.no_initial_load_model_only"],
        ["--model.name", "gpt2"],
        ["--model.flavor", "7B"],
        ["--training.steps", "0"],
        ["--training.max_norm", "-1"],
        ["--optimizer.lr", "0"],
        ["--optimizer.implementation", "cuda"],
        ["--lr_scheduler.decay_type", "step"],
        ["--lr_scheduler.decay_ratio", "1.5"],
        ["--lr_scheduler.min_lr_factor", "nan"],
        ["--parallelism.tensor_parallel_degree", "0"],
        ["--parallelism.data_parallel_shard_degree", "-2"],
        ["--metrics.log_freq", "0"],
    ],
    ids=lambda argv: argv[0],
)
def test_semantic_errors_name_the_key_and_value(argv: list[str]) -> None:
    problem = only_problem(argv)
    assert argv[0] in problem  # the flag
    assert argv[-1].strip() in problem  # the bad value (or the conflicting flag)


def test_bad_choice_suggests_close_value() -> None:
    assert "bfloat16" in only_problem(["--checkpoint.export_dtype", "bf16"])
    problem = only_problem(["--checkpoint.exclude_from_loading", "optimzer"])
    assert "did you mean optimizer" in problem


def test_edge_values_allowed() -> None:
    cfg = parse_args(
        ["--checkpoint.keep_latest_k", "1", "--parallelism.data_parallel_shard_degree", "4"], NO_ENV
    )
    assert cfg.checkpoint.keep_latest_k == 1
    assert parse("--checkpoint.keep_latest_k", "0").checkpoint.keep_latest_k == 0


def test_model_in_exclude_from_loading() -> None:
    problem = only_problem(["--checkpoint.exclude_from_loading", "model,optimizer"])
    assert "--checkpoint.exclude_from_loading" in problem and "always loaded" in problem


def test_async_mode_case_is_normalised() -> None:
    assert parse("--checkpoint.async_mode", "ASYNC").checkpoint.async_mode == "async"


def test_data_loader_normalises_to_dataloader(tmp_path: Path) -> None:
    path = write(tmp_path, '[checkpoint]\nexclude_from_loading = ["data_loader", "lr_scheduler"]\n')
    cfg = parse("--job.config_file", path)
    assert cfg.checkpoint.exclude_from_loading == ["dataloader", "lr_scheduler"]
    cfg = parse("--checkpoint.exclude_from_loading", "data_loader,dataloader,optimizer")
    assert cfg.checkpoint.exclude_from_loading == ["dataloader", "optimizer"]


def test_toml_syntax_error_names_the_path_and_keeps_cli_problems(tmp_path: Path) -> None:
    path = write(tmp_path, "[checkpoint]\ninterval = = 5\n")
    problems = problems_of(["--job.config_file", path, "--checkpoint.intervall", "3"])
    assert len(problems) == 2
    assert path in problems[0] and "line 2" in problems[0]
    assert "--checkpoint.intervall" in problems[1]


def test_missing_config_file_is_reported(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.toml")
    problem = only_problem(["--job.config_file", missing])
    assert missing in problem and "--job.config_file" in problem
    with pytest.raises(ConfigError, match="CONFIG_FILE"):
        parse_args([], {"CONFIG_FILE": missing})


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[checkpoint]\nintervall = 5\ninterval = 'ten'\nasync_mode = 'sometimes'\n"
        "[chekpoint]\nenable = true\n",
    )
    argv = [
        "--job.config_file", path, "--training.stepz", "3", "stray",
        "--checkpoint.keep_latest_k", "-1", "--checkpoint.export_dtype=fp8",
        "--checkpoint.exclude_from_loading", "model", "--metrics.log_freq",
    ]  # fmt: skip
    problems = problems_of(argv)
    expected = [
        "checkpoint.intervall", "checkpoint.interval in", "chekpoint", "--training.stepz",
        "'stray'", "--metrics.log_freq", "--checkpoint.keep_latest_k",
        "--checkpoint.export_dtype", "--checkpoint.async_mode", "--checkpoint.exclude_from_loading",
    ]  # fmt: skip
    assert len(problems) == len(expected), problems
    for key in expected:
        assert sum(key in p for p in problems) >= 1, key
    assert f"({len(expected)} problems)" in str(ConfigError(problems))


# --- help and export -------------------------------------------------------------------------


def _sections(cls: type, path: str):
    """(dotted section, dataclass) for every section and nested section of ``cls``."""
    for f in dataclasses.fields(cls):
        sub = type(getattr(cls(), f.name))
        if dataclasses.is_dataclass(sub):
            yield f"{path}{f.name}", sub
            yield from _sections(sub, f"{path}{f.name}.")


def test_help_mentions_every_field_with_its_doc() -> None:
    text = help_text()
    assert "CONFIG_FILE" in text and "--job.config_file" in text
    docs = field_docs()
    for section, cls in _sections(JobConfig, ""):
        keys = [f for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(type(getattr(cls(), f.name)))]
        if keys:
            assert f"\n[{section}]\n" in text
        for f in keys:
            doc = docs[(cls.__name__, f.name)]
            assert doc and doc.replace("\n", "\n      ") in text, f.name  # continuation lines indented
            assert f"--{section}.{f.name}" in text
    assert "--checkpoint.enable / --checkpoint.no_enable" in text
    assert "--checkpoint.interval INT (default: 500)" in text
    assert "--quantize.linear.float8.filter_fqns A,B,... (default: empty)" in text
    assert "[training.dataloader]\n  How batches are loaded" in text


def test_config_to_dict_is_json_ready() -> None:
    cfg = parse("--checkpoint.exclude_from_loading", "optimizer")
    data = json.loads(json.dumps(config_to_dict(cfg)))
    assert data["checkpoint"]["exclude_from_loading"] == ["optimizer"]
    assert data["job"]["dump_folder"] == "./outputs"


def test_config_to_toml_round_trip(tmp_path: Path) -> None:
    cfg = parse_args(
        [
            "--job.config_file", str(CONFIGS / "debug_model.toml"),
            "--checkpoint.enable", "--checkpoint.exclude_from_loading", "data_loader,optimizer",
            "--job.description", 'quotes " and \\ and tab\t and é',
            "--model.hf_assets_path", "/tmp/hf", "--optimizer.lr", "1e-5",
            "--parallelism.module_fqns_per_model_part", "tok_embeddings,layers.0;layers.1,norm,output",
        ],
        NO_ENV,
    )  # fmt: skip
    written = tmp_path / "resolved.toml"
    written.write_text(config_to_toml(cfg))
    again = parse("--job.config_file", str(written))
    assert again.job.config_file == str(written)
    again.job.config_file = cfg.job.config_file
    assert again == cfg
    assert "decay_ratio = 0.8" in config_to_toml(cfg)
    assert 'module_fqns_per_model_part = [["tok_embeddings", "layers.0"], ["layers.1", "norm", "output"]]' in \
        config_to_toml(cfg)
    defaults = JobConfig()
    assert "decay_ratio" not in config_to_toml(defaults)  # None is omitted


def test_load_step_without_enable_is_an_error() -> None:
    problem = only_problem(["--checkpoint.load_step", "5"])
    assert "--checkpoint.enable" in problem


# --- value ranges that torch or the data would otherwise fail on ----------------------------


@pytest.mark.parametrize(
    "argv, expect",
    [
        (["--optimizer.beta1", "5"], "--optimizer.beta1 must be in [0, 1)"),
        (["--optimizer.beta2", "1"], "--optimizer.beta2 must be in [0, 1)"),
        (["--optimizer.eps", "-1"], "--optimizer.eps must be finite and > 0"),
        (["--optimizer.weight_decay", "-1"], "--optimizer.weight_decay must be finite and >= 0"),
        (["--optimizer.lr", "inf"], "--optimizer.lr must be finite and > 0"),
        (["--training.max_norm", "nan"], "--training.max_norm must be finite and >= 0"),
        (["--training.seed", str(10**23)], "--training.seed must be between 0 and 4294967295"),
        (["--training.seed", "-1"], "--training.seed must be between 0 and 4294967295"),
        (["--training.seq_len", "100000000"], "--training.seq_len must be between 1 and 2048, the longest context "
                                              "of --model.flavor debugmodel"),
        (["--model.flavor", "8B", "--training.seq_len", "131073"], "between 1 and 131072"),
        (["--checkpoint.preemption_grace_seconds", "inf"], "--checkpoint.preemption_grace_seconds must be finite"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_values_torch_would_refuse_are_config_errors(argv: list[str], expect: str) -> None:
    assert expect in only_problem(argv)


def test_range_edges_are_allowed() -> None:
    cfg = parse("--optimizer.beta1", "0", "--optimizer.weight_decay", "0", "--training.seed", str(2**32 - 1),
                "--training.seq_len", "2048")
    assert cfg.training.seed == 2**32 - 1
    assert parse("--model.flavor", "8B", "--training.seq_len", "131072").training.seq_len == 131072


def test_dump_folder_under_a_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    problem = only_problem(["--job.dump_folder", str(tmp_path / "notes.txt/run")])
    assert f"{tmp_path / 'notes.txt'} is a file, not a folder" in problem
    assert parse("--job.dump_folder", str(tmp_path / "new/deeper")).job.dump_folder  # creatable: fine


@pytest.mark.parametrize("kind", ["device", "fifo", "folder", "oversized", "binary"])
def test_config_file_must_be_a_small_regular_text_file(tmp_path: Path, kind: str) -> None:
    import os

    path = tmp_path / "job.toml"
    if kind == "device":
        path = Path("/dev/zero")  # read whole, this was a 24 GB allocation
    elif kind == "fifo":
        os.mkfifo(path)  # opening it would block forever
    elif kind == "folder":
        path.mkdir()
    elif kind == "oversized":
        with open(path, "wb") as f:
            f.truncate(2 << 30)  # sparse: 2 GiB of zeros on no disk
    else:
        path.write_bytes(b"\xff\xfe[training]\n")
    problem = only_problem(["--job.config_file", str(path)])
    assert str(path) in problem
    want = {"device": "a character device", "fifo": "a FIFO", "folder": "a folder",
            "oversized": "more than the 1,048,576", "binary": "not UTF-8 text"}[kind]
    assert want in problem


def test_config_file_through_a_symlink_is_read(tmp_path: Path) -> None:
    link = tmp_path / "job.toml"
    link.symlink_to(CONFIGS / "debug_model.toml")
    assert parse("--job.config_file", str(link)).training.seq_len == 128


def test_help_shows_this_jobs_values(tmp_path: Path) -> None:
    path = write(tmp_path, "[training]\nseq_len = 128\nsteps = 10\n")
    text = help_text(argv=["--training.steps", "20", "--help"], environ={"CONFIG_FILE": path})
    assert f"--training.seq_len INT = 128 (from {path}; default: 2048)" in text
    assert "--training.steps INT = 20 (from the command line; default: 10000)" in text
    assert "--training.local_batch_size INT (default: 8)" in text  # not set anywhere: the default
    assert f"the defaults, then {path} (from CONFIG_FILE), then the command line" in text
    broken = help_text(argv=["--training.stepz", "2"], environ={"CONFIG_FILE": path})
    assert "1 problem(s); run without --help" in broken and "= 128" in broken


def test_config_checks_do_not_import_torch(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = ("import sys; from savepoint import cli; rc = cli.main(['check', '--job.config_file', '/dev/zero']); "
            "assert 'torch' not in sys.modules; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: invalid configuration: config file /dev/zero (from --job.config_file): /dev/zero is a character "
        "device, not a regular file: refusing to read it as a config file"]
