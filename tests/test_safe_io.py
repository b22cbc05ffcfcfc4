"""safe_io: names stay inside their folder, only regular files are opened, reads are bounded."""

from __future__ import annotations

import os

import pytest

from savepoint.errors import CheckpointError
from savepoint.safe_io import inside, open_append_regular, open_regular, read_regular, regular_size


def test_inside_refuses_escapes_and_symlinks(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_bytes(b"x")
    assert inside(tmp_path, "a/f") == tmp_path / "a" / "f"
    assert inside(tmp_path, "missing") == tmp_path / "missing"
    for bad in ("/etc/passwd", "../x", "a/../../x", "", "a\0b"):
        with pytest.raises(CheckpointError):
            inside(tmp_path, bad)
    (tmp_path / "link").symlink_to("/etc")
    with pytest.raises(CheckpointError, match="symbolic link"):
        inside(tmp_path, "link/passwd")


def test_only_regular_files_open(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="FIFO"):
        open_regular(fifo)  # would block forever with a plain open()
    with pytest.raises(CheckpointError, match="folder"):
        open_regular(tmp_path)
    with pytest.raises(CheckpointError, match="character device"):
        open_regular("/dev/zero")
    (tmp_path / "real").write_bytes(b"abc")
    (tmp_path / "sym").symlink_to(tmp_path / "real")
    with pytest.raises(CheckpointError, match="symbolic link"):
        open_regular(tmp_path / "sym")
    with pytest.raises(CheckpointError, match="symbolic link"):
        regular_size(tmp_path / "sym")
    with pytest.raises(CheckpointError, match="symbolic link"):
        open_append_regular(tmp_path / "sym")
    assert (tmp_path / "real").read_bytes() == b"abc"
    with pytest.raises(FileNotFoundError):
        open_regular(tmp_path / "none")
    assert regular_size(tmp_path / "none") is None
    with open_regular(tmp_path / "real") as f:
        assert f.read() == b"abc"


def test_reads_are_bounded_before_reading(tmp_path):
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(3 << 30)  # 3 GiB, no blocks on disk
    with pytest.raises(CheckpointError, match="more than the 1,024"):
        read_regular(sparse, limit=1024)
    (tmp_path / "small").write_bytes(b"12345")
    assert read_regular(tmp_path / "small", limit=5) == b"12345"
