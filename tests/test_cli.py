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


def savepoint(*args: str, config: str | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "CONFIG_FILE": config or str(ROOT / "configs/debug_model.toml")}
    return subprocess.run([sys.executable, "-m", "savepoint", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_cli_input(case):
    argv, expected = BAD_INPUTS[case]
    proc = savepoint("check", *argv)
    assert proc.returncode == 1
    assert expected in proc.stderr
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


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
