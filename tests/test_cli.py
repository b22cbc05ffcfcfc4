"""The `savepoint` command: bad input is one clear error and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

BAD_INPUTS = {
    "unknown key": (["--checkpoint.intervall", "5"], "did you mean --checkpoint.interval?"),
    "wrong type": (["--checkpoint.interval", "ten"], "--checkpoint.interval"),
    "bad export_dtype": (["--checkpoint.export_dtype", "fp8"], "--checkpoint.export_dtype"),
    "bad async_mode": (["--checkpoint.async_mode", "sometimes"], "--checkpoint.async_mode"),
    "interval 0": (["--checkpoint.interval", "0"], "--checkpoint.interval"),
    "negative keep_latest_k": (["--checkpoint.keep_latest_k", "-1"], "--checkpoint.keep_latest_k"),
    "unknown exclude name": (["--checkpoint.exclude_from_loading", "optimiser"], "did you mean optimizer?"),
}


def savepoint(*args: str, config: str | None = None, **extra_env: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "CONFIG_FILE": config or str(ROOT / "configs/debug_model.toml"), **extra_env}
    return subprocess.run([sys.executable, "-m", "savepoint", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_cli_input(case):
    argv, expected = BAD_INPUTS[case]
    proc = savepoint("check", *argv)
    assert proc.returncode == 1
    assert expected in proc.stderr
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


@pytest.mark.parametrize("world_size", ["abc", "0", "-2", "1.5"])
def test_a_bad_world_size_is_one_line(world_size):
    proc = savepoint("check", SAVEPOINT_WORLD_SIZE=world_size)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"error: invalid configuration: SAVEPOINT_WORLD_SIZE={world_size!r}")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert savepoint("check", SAVEPOINT_WORLD_SIZE="2").returncode == 0


def test_bad_toml(tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text("[checkpoint]\ninterval = 'ten'\nkeep_latest_k = -1\n[training\n")
    proc = savepoint("check", config=str(broken))
    assert proc.returncode == 1 and str(broken) in proc.stderr
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("[checkpoint]\ninterval = 'ten'\nkeep_latest_k = -1\nexport_dtype = 'fp8'\n"
                     "async_mode = 'sometimes'\nexclude_from_loading = ['optimiser']\n[training]\nsteps = 0\n")
    proc = savepoint("check", config=str(wrong))
    assert proc.returncode == 1
    for key in ("checkpoint.interval", "checkpoint.keep_latest_k", "checkpoint.export_dtype",
                "checkpoint.async_mode", "checkpoint.exclude_from_loading", "training.steps"):
        assert key in proc.stderr  # all problems, one report


def test_good_configs_check_clean():
    for config in sorted((ROOT / "configs").glob("*.toml")):
        proc = savepoint("check", config=str(config))
        assert proc.returncode == 0, proc.stderr


def test_inspect(train, tmp_path):
    train(stop_after=5)
    proc = savepoint("inspect", str(tmp_path / "run/checkpoint"))
    assert proc.returncode == 0 and "step-5" in proc.stdout and "full" in proc.stdout
    proc = savepoint("inspect", str(tmp_path / "run/checkpoint/step-5"))
    assert "optimizer" in proc.stdout and "train_state" in proc.stdout
    proc = savepoint("inspect", str(tmp_path / "nowhere"))
    assert proc.returncode == 1 and "error:" in proc.stderr


def test_toml_interval_zero():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        zero = Path(tmp) / "zero.toml"
        zero.write_text("[checkpoint]\ninterval = 0\n")
        proc = savepoint("check", config=str(zero))
    assert proc.returncode == 1 and "--checkpoint.interval" in proc.stderr


# ---- pipeline parallelism, checked before any process starts ------------------------------------

PP = "--parallelism.pipeline_parallel_degree"
SCHEDULE = "--parallelism.pipeline_parallel_schedule"
PARTS = "--parallelism.module_fqns_per_model_part"
# (NGPU, arguments, the one error line); the debug config: 6 layers, local_batch_size 8.
PIPELINE_CHECKS = [
    (4, [PP, "3"], "error: invalid configuration: --parallelism.pipeline_parallel_degree=3 x "
                   "--parallelism.data_parallel_replicate_degree=1 x --parallelism.tensor_parallel_degree=1 = 3 does "
                   "not divide the world size 4 (NGPU=4)"),
    (2, [PP, "2", SCHEDULE, "1FB1"], "error: invalid configuration: --parallelism.pipeline_parallel_schedule=1FB1 "
                                     "is not a pipeline schedule (did you mean 1F1B?)"),
    (4, [PP, "4", "--training.local_batch_size", "3"],
     "error: invalid configuration: --training.local_batch_size=3 / --parallelism.pipeline_parallel_microbatch_size=1 "
     "gives 3 microbatch(es), but --parallelism.pipeline_parallel_schedule=1F1B needs at least one per stage (4)"),
    (2, [PP, "2", PARTS, "tok_embeddings,layers.3,layers.4,layers.5;layers.0,layers.1,layers.2,norm,output"],
     "error: invalid configuration: --parallelism.module_fqns_per_model_part: model part 1 holds layers.0, which "
     "comes before layers.5 of model part 0 in the model"),
]


def test_pipeline_layouts_are_checked_before_launch():
    """``savepoint check`` with the world size run_train.sh passes: one line, exit 1; a pipeline that fits passes."""
    for ngpu, argv, line in PIPELINE_CHECKS:
        proc = savepoint("check", *argv, SAVEPOINT_WORLD_SIZE=str(ngpu))
        assert proc.returncode == 1, (argv, proc.stderr)
        assert proc.stderr.startswith(line) and len(proc.stderr.strip().splitlines()) == 1, (argv, proc.stderr)
    fits = [(2, [PP, "2"]), (4, [PP, "2", SCHEDULE, "interleaved1f1b"]),  # PP 2 x FSDP 2, 4 stages
            (2, [PP, "2", SCHEDULE, "ZBVZeroBubble", PARTS,
                 "tok_embeddings,layers.0;layers.1,layers.2;layers.3,layers.4;layers.5,norm,output"])]
    for ngpu, argv in fits:
        proc = savepoint("check", *argv, SAVEPOINT_WORLD_SIZE=str(ngpu))
        assert proc.returncode == 0 and proc.stderr == "", (argv, proc.stderr)


def test_run_train_help_lists_the_pipeline_keys():
    from tests.test_pipeline_plan import PP_HELP

    env = {"PATH": "/usr/bin:/bin", "SAVEPOINT_PYTHON": sys.executable}
    proc = subprocess.run(["./run_train.sh", "--help", PARTS, "tok_embeddings;norm"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [line.strip() for line in proc.stdout.splitlines()]
    for usage in PP_HELP:  # the config file or the command line may set a value: it shows next to the default
        flag, default = usage.split(" (default: ")
        assert any(line.startswith(flag) and line.endswith(f"default: {default}") for line in lines), usage
    assert f"{PARTS} A,B;C,D;... = tok_embeddings;norm (from the command line; default: none)" in lines


# ---- help and unknown commands (in-process) -------------------------------------------------------

def _main(capsys, *argv: str) -> tuple[int, str, str]:
    from savepoint import cli

    capsys.readouterr()
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("argv", [[], ["--help"], ["-h"]])
def test_top_level_help_goes_to_stdout(argv, capsys):
    code, out, err = _main(capsys, *argv)
    assert code == 0 and err == ""
    assert out.startswith("usage: savepoint COMMAND")
    for command in ("train", "check", "inspect", "verify", "convert", "to_torchtune"):
        assert f"savepoint {command}" in out or command in out
    assert "The only place" not in out and "``" not in out  # the module docstring is not the usage


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_command_help(command, capsys):
    for flag in ("--help", "-h"):
        code, out, err = _main(capsys, command, flag)
        assert code == 0 and err == "" and out.startswith(f"usage: savepoint {command} FOLDER|STEP_DIR")


def test_convert_help_lists_every_direction(capsys):
    for argv in (["convert", "--help"], ["convert"]):
        code, out, err = _main(capsys, *argv)
        assert code == 0 and err == ""
        for direction in ("from_hf", "to_hf", "to_torchtune"):
            assert f"savepoint convert {direction} " in out


@pytest.mark.parametrize(("argv", "line"), [
    (["inpsect", "x"], "error: unknown command 'inpsect'; did you mean inspect? (savepoint --help lists them)"),
    (["verfy"], "error: unknown command 'verfy'; did you mean verify? (savepoint --help lists them)"),
    (["frobnicate"], "error: unknown command 'frobnicate': it is one of train, check, inspect, verify, convert, "
                     "plot (savepoint --help describes them)"),
    (["convert", "to_torchtun", "a", "b"], "error: unknown conversion 'to_torchtun'; did you mean to_torchtune? "
                                           "(savepoint convert --help lists them)"),
])
def test_unknown_command_is_one_error_line(argv, line, capsys):
    code, out, err = _main(capsys, *argv)
    assert code == 1 and out == "" and err == line + "\n"
