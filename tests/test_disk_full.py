"""A full disk during a save loses nothing, and the error says the disk is full.

Two ways to fill it: a file size limit (``setrlimit(RLIMIT_FSIZE)`` around one save, in a
subprocess that ignores SIGXFSZ, so write() fails with EFBIG), and a real 40 MB tmpfs (ENOSPC;
needs permission to mount, skipped without it).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import FAST_ARGS, ROOT

DRIVER = r"""
import json, resource, signal, sys
from pathlib import Path
from savepoint import cli
from savepoint.checkpoint.manager import CheckpointManager

dump, fail_step = sys.argv[1], int(sys.argv[2])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() past the limit returns EFBIG instead of killing us
original = CheckpointManager.save
before = {}

def save(self, step, last_step=False):
    if step != fail_step:
        return original(self, step, last_step)
    step5 = self.folder.step_dir(5)
    before.update({p.name: p.read_bytes() for p in step5.iterdir()})
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, hard))
    try:
        return original(self, step, last_step)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

CheckpointManager.save = save
code = cli.main(["train", "--job.config_file", sys.argv[3], "--job.dump_folder", dump, *sys.argv[4:]])
step5 = Path(dump) / "checkpoint" / "step-5"
unchanged = before == {p.name: p.read_bytes() for p in step5.iterdir()}
entries = sorted(p.name for p in (Path(dump) / "checkpoint").iterdir() if p.name != ".savepoint.lock")
print("RESULT " + json.dumps({"code": code, "step5_unchanged": unchanged, "entries": entries}))
"""


def run_driver(tmp_path, name: str, fail_step: int) -> tuple[dict, str]:
    cmd = [sys.executable, "-c", DRIVER, str(tmp_path / name), str(fail_step),
           str(ROOT / "configs/debug_model.toml"), *FAST_ARGS, "--training.steps", "12"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert result, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(result[-1][len("RESULT "):]), proc.stdout + proc.stderr


def test_periodic_save_on_a_full_disk_is_logged_and_training_goes_on(tmp_path):
    result, output = run_driver(tmp_path, "periodic", fail_step=10)
    assert result["code"] == 0, output[-3000:]
    assert result["entries"] == ["step-12", "step-5"]  # no step-10, no .step-10.partial
    assert result["step5_unchanged"]
    error = next(line for line in output.splitlines() if "ERROR" in line and "saving step 10" in line)
    assert "[Errno 27] File too large" in error and "Disk full:" in error
    assert "--checkpoint.keep_latest_k" in error and str(tmp_path / "periodic/checkpoint") in error
    assert error.endswith("training continues and the next save retries")
    assert "saved step 12" in output


def test_final_save_on_a_full_disk_fails_the_run(tmp_path):
    result, output = run_driver(tmp_path, "final", fail_step=12)
    assert result["code"] == 1
    assert result["entries"] == ["step-10", "step-5"]
    assert result["step5_unchanged"]
    assert list((tmp_path / "final/checkpoint").glob(".savepoint.lock")) == []  # released at exit
    error = next(line for line in output.splitlines() if line.startswith("error: "))
    assert "saving step 12" in error and "File too large" in error and "--checkpoint.keep_latest_k" in error


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 40 MB tmpfs (too small for one step of the debug model); skipped where mounting is not allowed."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); "
                    "test_periodic_save_on_a_full_disk_is_logged_and_training_goes_on covers EFBIG")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_filesystem_names_enospc_and_the_disk_full_hint(small_tmpfs, capsys):
    """torch's zip writer turns the write's ENOSPC into 'unexpected pos'; the save reports the ENOSPC."""
    from savepoint import cli
    from savepoint.checkpoint import lock

    dump = small_tmpfs / "run"
    code = cli.main(["train", "--job.config_file", str(ROOT / "configs/debug_model.toml"), "--job.dump_folder",
                     str(dump), *FAST_ARGS, "--training.steps", "2", "--checkpoint.interval", "1"])
    lock._release_all()
    out = capsys.readouterr()
    assert code == 1
    logged = next(line for line in out.out.splitlines() if "ERROR" in line and "saving step 1" in line)
    error = out.err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: saving step 2"), out.err
    for line in (logged, error[0]):
        assert "OSError: [Errno 28] No space left on device" in line and "unexpected pos" not in line
        assert f"Disk full: the disk holding {dump}/checkpoint is full (" in line
        assert "--checkpoint.keep_latest_k" in line
    assert sorted(p.name for p in (dump / "checkpoint").iterdir()) == []  # nothing committed, nothing left
