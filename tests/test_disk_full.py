"""A full disk (here: a file size limit, so write() fails with EFBIG) during a save loses nothing.

The limit is set with ``setrlimit(RLIMIT_FSIZE)`` around one save, in a subprocess that ignores
SIGXFSZ, so the write fails the way it does on a full or size-limited filesystem.
"""

from __future__ import annotations

import json
import subprocess
import sys

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
