"""Hostile checkpoints: manifests, paths and data files crafted (or broken) to crash, hang, exhaust memory,
read outside the step, or switch verification off.

Each damaged step must count as corrupt: ``verify`` names it and exits 1, an explicit
``--checkpoint.load_step`` fails with one line, auto-resume falls back to the step before
(logging CORRUPT CHECKPOINT), and no byte of the damaged step changes. Only a folder that never
had manifests (TorchTitan's) loads unverified, and ``--checkpoint.require_checksums`` refuses even
that. The damage itself is in ``tests/hostile.py``; forgeries reseal the manifest, so each check
stands without a checksum mismatch to lean on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from savepoint.checkpoint import lock as lock_module
from savepoint.checkpoint.manifest import MAX_DEPTH, _nesting_within, read_manifest, step_checksums
from savepoint.checkpoint.reader import VerifyingReader
from savepoint.checkpoint.storage import CheckpointFolder
from savepoint.errors import CheckpointError, CorruptCheckpointError
from tests import hostile
from tests.conftest import FAST_ARGS, ROOT, make_config, run_cli

CONFIG = ROOT / "configs" / "debug_model.toml"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A dump folder with committed full steps 5 and 10 (debug model), built once."""
    from savepoint.train import Trainer

    dump = tmp_path_factory.mktemp("hostile") / "base"
    trainer = Trainer(make_config(dump, "--training.steps", "10"))
    trainer.train()
    trainer.checkpointer.close()
    assert CheckpointFolder(dump / "checkpoint").committed_steps() == [5, 10]
    return dump


def copy_of(base: Path, where: Path, titan: bool = False) -> Path:
    dump = where / "run"
    shutil.copytree(base, dump)
    if titan:
        hostile.as_torchtitan(dump / "checkpoint")
    return dump


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` -> what it is (hash of a regular file, link target, 'dir', 'fifo')."""
    out = {}
    for folder, dirs, names in os.walk(root):
        for name in dirs + names:
            path = Path(folder) / name
            if path.name == lock_module.LOCK_NAME:
                continue
            if path.is_symlink():
                kind = "link " + os.readlink(path)
            elif path.is_dir():
                kind = "dir"
            elif path.is_fifo():
                kind = "fifo"
            elif path.stat().st_size > 1 << 30:
                kind = f"sparse {path.stat().st_size}"
            else:
                kind = hashlib.sha256(path.read_bytes()).hexdigest()
            out[str(path.relative_to(root))] = kind
    return out


def train_argv(dump: Path, *extra: str) -> list[str]:
    return ["train", "--job.config_file", str(CONFIG), "--job.dump_folder", str(dump), *FAST_ARGS,
            "--training.steps", "10", "--checkpoint.load_only", *extra]


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# damage of step-10 -> words the verify line and the load_step error must hold ({step} = the step folder)
DAMAGES = {
    "deep_manifest": ["manifest.json is corrupt", "nested more than 32 levels"],
    "deep_object_manifest": ["manifest.json is corrupt", "nested more than 32 levels"],
    "files_is_a_list": ["manifest.json is corrupt", "checksums.files is a list, not an object"],
    "top_files_is_a_list": ["manifest.json is corrupt", "files is a list, not an object"],
    "segment_is_a_string": ["manifest.json is corrupt", "segments[3] is a string"],
    "job_config_is_a_list": ["manifest.json is corrupt", "job_config is a list"],
    "offset_past_end": ["__0_0.distcp is corrupt", "places 'tok_embeddings.weight' at bytes [", "but the file has"],
    "offset_2_40": ["__0_0.distcp is corrupt", "at bytes [1099511627776,"],
    "length_2_40": ["__0_0.distcp is corrupt", "places 'tok_embeddings.weight' at bytes [", "but the file has"],
    "huge_shape": [".metadata is corrupt", "'optimizer.state.tok_embeddings.weight.exp_avg'",
                   "[2147483648, 2147483648]", "would need 18,446,744,073,709,551,616 bytes"],
    "huge_model_shape": [".metadata is corrupt", "'tok_embeddings.weight' has shape [2147483648, 2147483648]"],
    "absolute_relative_path": ["points outside the folder", "Nothing outside the folder was read"],
    "dotdot_relative_path": ["'../../outside.distcp' points outside the folder"],
    "names_etc_shadow": ["manifest.json is corrupt", "'/etc/shadow'", "not a file of the step folder"],
    "names_a_parent_file": ["manifest.json is corrupt", "'../step-5/__0_0.distcp'"],
    "whole_file_segments": ["manifest.json is corrupt", "segments[1] is bytes [0, ",
                            "without gaps or overlaps"],
    "no_segments": ["manifest.json is corrupt", "segments cover bytes [0, 0) of a "],
    "symlinked_step": ["step-10 is a symbolic link", "not followed"],
    "symlinked_data_file": ["__0_0.distcp is a symbolic link", "not followed"],
    "manifest_deleted": ["manifest.json is missing, but step-5 in the same folder has one"],
    "checksums_deleted": ["manifest.json is corrupt: it has no checksums"],
    "manifest_is_a_folder": ["manifest.json is a folder, not a regular file"],
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_step_is_corrupt_for_verify_and_load_step(damage, base, tmp_path, capsys):
    dump = copy_of(base, tmp_path)
    root = dump / "checkpoint"
    getattr(hostile, damage)(root / "step-10")
    before = snapshot(dump)
    words = DAMAGES[damage]

    code, out, err = run_cli(["verify", str(root)], capsys)
    assert code == 1, out
    assert f"{root}/step-5: OK, checksums match" in out
    bad = [line for line in out.splitlines() if line.startswith(f"{root}/step-10: CORRUPT: ")]
    assert bad, out
    for word in words:
        assert word in bad[0], bad[0]
    assert "1 of 2 step(s) failed verification: step-10" in one_error_line(err)

    code, out, err = run_cli(train_argv(dump, "--checkpoint.load_step", "10"), capsys)
    line = one_error_line(err)
    assert code == 1
    for word in words:
        assert word in line, line
    assert "savepoint verify" in line and "--checkpoint.load_step" in line
    assert snapshot(dump) == before  # nothing written into, or removed from, the damaged step


@pytest.mark.parametrize("damage", ["manifest_deleted", "whole_file_segments", "absolute_relative_path"])
def test_auto_resume_falls_back_past_the_damaged_step(damage, base, tmp_path, caplog):
    from savepoint.train import Trainer

    dump = copy_of(base, tmp_path)
    getattr(hostile, damage)(dump / "checkpoint/step-10")
    before = snapshot(dump / "checkpoint")
    trainer = Trainer(make_config(dump, "--training.steps", "6", "--checkpoint.load_only"))
    with caplog.at_level(logging.ERROR, logger="savepoint"):
        trainer.train()
    trainer.checkpointer.close()
    assert trainer.loaded_step == 5
    assert any("CORRUPT CHECKPOINT" in r.getMessage() and "step-10" in r.getMessage() for r in caplog.records)
    assert snapshot(dump / "checkpoint") == before


def test_torchtitan_folder_loads_unverified_unless_checksums_are_required(base, tmp_path, capsys, caplog):
    dump = copy_of(base, tmp_path, titan=True)
    root = dump / "checkpoint"
    code, out, err = run_cli(["verify", str(root)], capsys)
    assert code == 0 and out.count("structure OK, no checksums to check") == 2, out + err
    with caplog.at_level(logging.WARNING, logger="savepoint"):
        code, out, err = run_cli(train_argv(dump, "--checkpoint.load_step", "10"), capsys)
    assert code == 0, err
    assert any("has no checksums (written by TorchTitan" in r.getMessage() and "loading it unverified" in
               r.getMessage() for r in caplog.records)
    code, out, err = run_cli(train_argv(dump, "--checkpoint.require_checksums"), capsys)
    line = one_error_line(err)
    assert code == 1 and f"{root}/step-10 has no checksums" in line and "--checkpoint.require_checksums" in line
    # A savepoint-written step alone in a folder, its manifest gone: its .metadata still tells.
    lone = tmp_path / "lone"
    shutil.copytree(base / "checkpoint/step-10", lone / "step-10")
    (lone / "step-10/manifest.json").unlink()
    with pytest.raises(CorruptCheckpointError, match=r"shows savepoint wrote this step \(into .step-10.partial\)"):
        VerifyingReader.for_step(lone / "step-10").read_metadata()


def test_a_whole_file_segment_is_read_once(base, tmp_path, capsys, monkeypatch):
    """An honest manifest with one segment over the whole data file: each item's read is served from one read."""
    dump = copy_of(base, tmp_path)
    hostile.one_whole_file_segment(dump / "checkpoint/step-10")
    from savepoint.checkpoint import reader as integrity

    reads = []
    real_read = integrity._check_bytes

    def counting(path, segments, base_offset, data):
        reads.append(len(data))
        return real_read(path, segments, base_offset, data)

    monkeypatch.setattr(integrity, "_check_bytes", counting)
    code, out, err = run_cli(train_argv(dump, "--checkpoint.load_step", "10"), capsys)
    assert code == 0, err
    size = (dump / "checkpoint/step-10/__0_0.distcp").stat().st_size
    assert reads.count(size) == 1, reads  # not once per item (1176 times, 70 GB)


def test_manifest_nesting_is_bounded_before_parsing():
    assert _nesting_within(b'{"a": [[1, 2, "]]]]"], {"b": {}}]}', MAX_DEPTH)
    assert _nesting_within(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH, MAX_DEPTH)
    assert not _nesting_within(b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), MAX_DEPTH)
    assert not _nesting_within(b'["\\"[", [', MAX_DEPTH)  # unbalanced: an escaped quote does not end the string


def test_one_manifest_reader(base, tmp_path):
    """CheckpointFolder.read_manifest is manifest.read_manifest: the same checks, the same errors."""
    dump = copy_of(base, tmp_path)
    folder = CheckpointFolder(dump / "checkpoint")
    assert folder.read_manifest(10) == read_manifest(folder.step_dir(10))
    hostile.deep_manifest(folder.step_dir(10))
    with pytest.raises(CorruptCheckpointError, match="nested more than"):
        folder.read_manifest(10)
    assert folder.read_manifest(7) is None


HANG_DRIVER = r"""
import json, resource, sys
from savepoint import cli
from savepoint.checkpoint import lock

for argv in json.loads(sys.argv[1]):
    code = cli.main(argv)
    lock._release_all()
    print(json.dumps({"argv": argv, "code": code}), flush=True)
print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}), flush=True)
"""


def test_fifos_and_sparse_files_neither_block_nor_allocate(base, tmp_path):
    """A FIFO as a data file blocked the load forever; sparse 3 GB files were read whole (4 GB RSS).

    One subprocess runs every scenario (so a hang fails the test by its timeout instead of hanging
    the suite), and reports its peak RSS: reading any of the sparse files would exceed it.
    """
    runs, expect = [], []
    for damage, titan, command, words in [
        ("fifo_data_file", True, "load", "__0_0.distcp is a FIFO (named pipe), not a regular file"),
        ("fifo_bytes_item", False, "load", "extra.bin is a FIFO (named pipe), not a regular file"),
        ("sparse_manifest", False, "verify", "1 of 2 step(s) failed verification: step-10"),
        ("sparse_manifest", False, "load", "manifest.json is 3,221,225,472 bytes, more than the 268,435,456"),
        ("sparse_metadata", False, "load", ".metadata is corrupt: 3221225472 bytes, but 2"),
        ("sparse_metadata", True, "load", ".metadata is 3,221,225,472 bytes, more than the 1,073,741,824"),
    ]:
        dump = copy_of(base, tmp_path / f"{damage}-{titan}-{command}", titan=titan)
        getattr(hostile, damage)(dump / "checkpoint/step-10")
        argv = ["verify", str(dump / "checkpoint")] if command == "verify" else \
            train_argv(dump, "--checkpoint.load_step", "10")
        runs.append(argv)
        expect.append((dump, words, snapshot(dump / "checkpoint")))
    env = {k: v for k, v in os.environ.items() if k not in ("SAVEPOINT_DEBUG", "RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-c", HANG_DRIVER, json.dumps(runs)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(runs) + 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in proc.stderr and len(errors) == len(runs), proc.stderr[-3000:]
    for result, error, (dump, words, before) in zip(results, errors, expect, strict=False):
        assert result["code"] == 1
        assert words in error, error
        assert snapshot(dump / "checkpoint") == before
    assert results[-1]["peak_rss"] < 1.5e9, results[-1]


def test_unsafe_names_in_a_manifest_are_refused_before_any_stat(base, tmp_path):
    dump = copy_of(base, tmp_path)
    step = dump / "checkpoint/step-10"
    hostile.names_etc_shadow(step)
    with pytest.raises(CorruptCheckpointError) as err:
        step_checksums(step)
    assert "is corrupt: checksums.files['/etc/shadow'] names '/etc/shadow'" in str(err.value)  # not its size
    with pytest.raises(CheckpointError):
        read_manifest(step)
