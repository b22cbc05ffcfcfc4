"""Object-store URLs are refused with one line, never taken as a relative path (``s3://ckpt/run`` would
otherwise become a local folder ``s3:/ckpt/run`` and nothing would reach the store)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


def savepoint(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "savepoint", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("flag", ["--checkpoint.folder", "--job.dump_folder", "--checkpoint.initial_load_path",
                                  "--checkpoint.memory_folder", "--model.hf_assets_path"])
def test_training_refuses_url_paths(tmp_path, flag):
    out = savepoint("check", "--checkpoint.enable", flag, "s3://ckpt/run", cwd=tmp_path)
    assert out.returncode == 1
    assert f"{flag}=s3://ckpt/run: s3:// URLs (object storage) are not supported yet" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "s3:").exists()


def test_commands_refuse_url_paths(tmp_path):
    for command in ("inspect", "verify"):
        out = savepoint(command, "gs://bucket/step-5", cwd=tmp_path)
        assert out.returncode == 1 and "gs:// URLs (object storage) are not supported yet" in out.stderr, out.stderr
    out = savepoint("convert", "to_hf", "s3://b/step-1", str(tmp_path / "hf"), "--model_flavor", "debugmodel",
                    cwd=ROOT)
    assert out.returncode == 1 and "to_hf: input s3://b/step-1: s3:// URLs" in out.stderr, out.stderr
    assert not (tmp_path / "hf").exists()
