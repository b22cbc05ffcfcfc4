"""URLs on the command line: ``s3://`` where an option takes object storage, one clear line everywhere else.

A URL is never taken as a relative path (``s3://ckpt/run`` would otherwise become a local folder
``s3:/ckpt/run`` and nothing would reach the store).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


def savepoint(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "savepoint", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("flag", ["--checkpoint.memory_folder", "--model.hf_assets_path"])
def test_local_only_options_refuse_urls(tmp_path, flag):
    out = savepoint("check", "--checkpoint.enable", flag, "s3://ckpt/run", cwd=tmp_path)
    assert out.returncode == 1
    assert f"{flag}=s3://ckpt/run: this option takes a local path, not a URL" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "s3:").exists()


def test_dump_folder_must_be_local(tmp_path):
    out = savepoint("check", "--checkpoint.enable", "--job.dump_folder", "s3://ckpt/run", cwd=tmp_path)
    assert out.returncode == 1
    assert "--job.dump_folder=s3://ckpt/run: the dump folder holds the job's logs" in out.stderr
    assert "--checkpoint.folder s3://<bucket>/<prefix>" in out.stderr


@pytest.mark.parametrize("flag", ["--checkpoint.folder", "--checkpoint.initial_load_path"])
def test_s3_options_accept_s3_and_refuse_other_schemes(tmp_path, flag):
    assert savepoint("check", "--checkpoint.enable", flag, "s3://ckpt/run", cwd=tmp_path).returncode == 0
    out = savepoint("check", "--checkpoint.enable", flag, "gs://ckpt/run", cwd=tmp_path)
    assert out.returncode == 1 and f"{flag}=gs://ckpt/run: gs:// is not supported yet" in out.stderr, out.stderr
    out = savepoint("check", "--checkpoint.enable", flag, "s3://Bad_Bucket/run", cwd=tmp_path)
    assert out.returncode == 1 and "'Bad_Bucket' is not a bucket name" in out.stderr, out.stderr
    out = savepoint("check", "--checkpoint.enable", flag, "s3://ckpt/a/../b", cwd=tmp_path)
    assert out.returncode == 1 and "has an empty, '.' or '..' part" in out.stderr, out.stderr


def test_memory_tier_refused_with_an_s3_folder(tmp_path):
    out = savepoint("check", "--checkpoint.enable", "--checkpoint.folder", "s3://ckpt/run",
                    "--checkpoint.memory_interval", "1", cwd=tmp_path)
    assert out.returncode == 1 and "the in-memory tier is not supported with an s3:// folder yet" in out.stderr


def test_commands_refuse_other_schemes(tmp_path):
    for command in ("inspect", "verify"):
        out = savepoint(command, "gs://bucket/step-5", cwd=tmp_path)
        assert out.returncode == 1 and "gs:// is not supported yet" in out.stderr, out.stderr
    out = savepoint("convert", "to_hf", "gs://b/step-1", str(tmp_path / "hf"), "--model_flavor", "debugmodel",
                    cwd=ROOT)
    assert out.returncode == 1 and "to_hf: input gs://b/step-1: gs:// is not supported yet" in out.stderr, out.stderr
    assert not (tmp_path / "hf").exists()
