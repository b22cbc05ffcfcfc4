"""Two processes (FSDP 2, gloo) on an ``s3://`` folder through ``./run_train.sh``: the launcher SIGKILLed in the
middle of a save leaves no step, the next start removes what it left and resumes; then a resharded load
(1 process, model only) fetches only the byte ranges it needs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from savepoint.checkpoint.object_folder import ObjectFolder, listing
from savepoint.checkpoint.objstore import client
from savepoint.durable import MANIFEST
from tests.conftest import ROOT
from tests.s3server import s3_bucket, s3_env, s3_server  # noqa: F401  (fixtures)
from tests.trials.folder import read_losses

pytestmark = pytest.mark.distributed

JOB = ["--training.seq_len", "16", "--training.local_batch_size", "1", "--lr_scheduler.warmup_steps", "2",
       "--checkpoint.enable", "--checkpoint.interval", "2", "--checkpoint.keep_latest_k", "0",
       "--checkpoint.no_last_save_model_only", "--metrics.log_freq", "1"]


def _launch(dump, args: list[str], env: dict[str, str]) -> subprocess.Popen:
    full = {"OMP_NUM_THREADS": "1", **os.environ, "SAVEPOINT_PYTHON": sys.executable, "NGPU": "2", **env}
    for name in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "MAX_RESTARTS"):
        full.pop(name, None)
    with open(dump / "out.log", "ab") as out:
        return subprocess.Popen([str(ROOT / "run_train.sh"), "--job.dump_folder", str(dump), *JOB, *args], cwd=ROOT,
                                env=full, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def _kill_mid_save(proc: subprocess.Popen, folder: ObjectFolder, deadline: float) -> int | None:
    """SIGKILL the launcher once some step's data is in the folder but its manifest is not; returns that step."""
    while time.monotonic() < deadline and proc.poll() is None:
        for step, prefix in sorted(folder._step_prefixes().items()):
            names = listing(prefix)
            if any(n.endswith(".distcp") for n in names) and MANIFEST not in names:
                os.kill(proc.pid, signal.SIGKILL)  # the launcher only: its workers die with it
                proc.wait()
                return step
        time.sleep(0.01)
    return None


def test_launcher_killed_mid_save_then_resume_and_a_partial_load(tmp_path, s3_bucket, train):  # noqa: F811
    url = f"s3://{s3_bucket}/run"
    env = {k: os.environ[k] for k in os.environ if k.startswith("AWS_")}
    dump = tmp_path / "job"
    dump.mkdir()
    folder = ObjectFolder(url)
    killed = None
    for _ in range(3):  # a kill that lands after the commit is retried at a later save
        proc = _launch(dump, ["--checkpoint.folder", url, "--training.steps", "200"], env)
        killed = _kill_mid_save(proc, folder, time.monotonic() + 120)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if killed is not None:
            break
    log = (dump / "out.log").read_text(errors="replace")
    assert killed is not None, log[-3000:]
    time.sleep(1.0)  # the workers' deaths (they follow the launcher's at once) settle
    committed = folder.committed_steps()
    assert killed not in committed, (killed, committed)  # data without a manifest is no step
    assert any(n.endswith(".distcp") for n in listing(folder.step_dir(killed)))
    latest = committed[-1] if committed else 0
    steps = max(killed, latest) + 2

    proc = _launch(dump, ["--checkpoint.folder", url, "--training.steps", str(steps)], env)
    assert proc.wait(timeout=300) == 0, (dump / "out.log").read_text(errors="replace")[-3000:]
    log = (dump / "out.log").read_text(errors="replace")
    assert f"removing leftover {folder.step_dir(killed)} from an interrupted save" in log, log[-3000:]
    assert f"from step {latest} to {steps} on cpu, FSDP 2" in log, log[-3000:]
    assert folder.committed_steps()[-1] == steps and killed in folder.committed_steps()  # saved again, whole
    assert {"__0_0.distcp", "__1_0.distcp"} <= set(listing(folder.step_dir(steps)))
    records, _ = read_losses(dump)
    assert max(step for step, _ in records) == steps

    # A 1-process load of the model alone (the FSDP(2) step resharded): only the model's byte ranges are fetched.
    import s3fs

    fetched = []
    real = s3fs.core.S3File._fetch_range

    def counting(self, start, end):
        data = real(self, start, end)
        fetched.append((self.path.rsplit("/", 1)[-1], len(data)))
        return data

    sizes = listing(folder.step_dir(steps))
    s3fs.core.S3File._fetch_range = counting
    try:
        loaded = train("--checkpoint.folder", url, "--checkpoint.exclude_from_loading", "optimizer,dataloader",
                       "--training.steps", str(steps + 1), "--training.seq_len", "16", "--training.local_batch_size",
                       "1", "--lr_scheduler.warmup_steps", "2", stop_after=steps, dump=tmp_path / "one")
    finally:
        s3fs.core.S3File._fetch_range = real
    assert loaded.train_state.step == steps
    data = {name: 0 for name in ("__0_0.distcp", "__1_0.distcp")}
    for name, n in fetched:
        if name in data:
            data[name] += n
    for name, n in data.items():
        assert 0 < n < 0.6 * sizes[name], (name, n, sizes[name])  # the optimizer's 2/3 of each file stay unread
    assert client()  # the session's client still answers
