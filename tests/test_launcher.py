"""The launcher: no process of a job outlives it (or its trainer), and SIGTERM with no worker ends it at once."""

from __future__ import annotations

import functools
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from savepoint import launch, lifeline
from savepoint.checkpoint.storage import CheckpointFolder
from tests.conftest import ROOT, losses
from tests.test_run_train import TINY
from tests.trials import launcher as _launcher_trials

LIFELINE = Path(lifeline.__file__)
GRACE_S = 2.0  # every process of a killed job must be gone by then
_harness = functools.cache(lambda: _launcher_trials)  # tests/trials/launcher.py: its /proc readers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(condition, what: str, proc: subprocess.Popen, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        assert proc.poll() is None, f"exited {proc.returncode} while waiting for {what}: {proc.communicate()}"
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _children(pid: int) -> list[int]:
    kt = _harness()
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and (kt._proc_stat(int(p)) or ("", 0, 0))[1] == pid]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _writers(trainer: int) -> list[int]:
    """The trainer's DCP writer processes (multiprocessing spawn children; not the resource tracker)."""
    return [p for p in _children(trainer) if "spawn_main" in _cmdline(p)]


def _alive(pid: int) -> bool:
    stat = _harness()._proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def _gone_within(pids, seconds: float) -> list[int]:
    """The pids still alive after ``seconds`` (polled; returns as soon as all are gone)."""
    deadline = time.monotonic() + seconds
    left = [p for p in pids if _alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.01)
        left = [p for p in left if _alive(p)]
    return left


def test_worker_wrapper_execs_only_under_its_launcher(tmp_path):
    """lifeline.py arms the death signal, checks the parent is the launcher it was told, and execs."""
    ok = subprocess.run([sys.executable, "-I", "-S", str(LIFELINE), str(os.getpid()), sys.executable, "-c",
                         "import ctypes, os; v = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(v)); "
                         "print(os.getpid(), v.value)"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.split()[1] == str(int(signal.SIGKILL))  # PR_GET_PDEATHSIG after the exec: still armed
    orphan = subprocess.run([sys.executable, "-I", "-S", str(LIFELINE), "1", "echo", "ran"], capture_output=True,
                            text=True, timeout=60)
    assert orphan.returncode == 1 and "ran" not in orphan.stdout  # its launcher is gone: never starts


def test_launcher_rejects_a_bad_process_count(capsys):
    for bad in ("0", "-1", "abc"):
        assert launch.main(["--nproc_per_node", bad, "-m", "savepoint", "train"]) == 1
        err = capsys.readouterr().err
        assert err.strip().splitlines() == [err.strip()] and err.startswith(f"error: --nproc_per_node={bad}: "), err


def test_sigkill_of_the_launcher_mid_save_takes_every_process_along_and_the_restart_resumes(tmp_path):
    """SIGKILL of ./run_train.sh (it execs the launcher) while both ranks' writer processes write a save."""
    kt = _harness()
    dump = tmp_path / "out"
    env = {"OMP_NUM_THREADS": "1", **os.environ, "SAVEPOINT_PYTHON": sys.executable, "NGPU": "2"}
    base = ["./run_train.sh", "--job.dump_folder", str(dump), *TINY, "--checkpoint.enable", "--checkpoint.interval",
            "2", "--checkpoint.async_mode", "async_with_pinned_mem", "--checkpoint.no_last_save_model_only",
            "--metrics.log_freq", "1"]
    proc = subprocess.Popen([*base, "--training.steps", "100000"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        root = dump / "checkpoint"
        # Both writer processes started (at the first save), and a later save is being written.
        _wait_for(lambda: (root / "step-2").is_dir() and any(n.endswith(".partial") for n in os.listdir(root)),
                  "a save in flight after step-2", proc)
        job = kt.job_processes(proc.pid, dump)
        workers = [p for p in _children(proc.pid) if "savepoint train" in _cmdline(p)]
        assert len(workers) == 2 and all(len(_writers(w)) == 1 for w in workers), job
        os.kill(proc.pid, signal.SIGKILL)  # the launcher alone: kill -9 PID, the OOM killer
        proc.wait(timeout=30)
        left = _gone_within(job, GRACE_S)
        assert not left, {p: _cmdline(p) for p in left}
        assert not kt.job_processes(proc.pid, dump)
    finally:
        for pid in kt.job_processes(proc.pid, dump):
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
    newest = CheckpointFolder(root).committed_steps()[-1]
    # The restart, at once: the folder lock is free, it resumes from the newest committed step.
    done = subprocess.run([*base, "--training.steps", str(newest + 2)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(rf"from step {newest} to {newest + 2}", done.stdout), done.stdout[-3000:]
    assert CheckpointFolder(root).committed_steps()[-1] == newest + 2
    assert sorted(losses(dump)) == list(range(1, newest + 3))


def test_writer_process_dies_with_its_trainer(tmp_path):
    """Two ranks without torchrun; rank 1's writer is stopped, so rank 0's writer waits for it in a
    collective; SIGKILL of trainer 0 must take its writer along (it would otherwise wait 30 minutes)."""
    port = _free_port()
    dump = tmp_path / "out"
    cmd = [sys.executable, "-m", "savepoint", "train", "--job.dump_folder", str(dump), *TINY, "--training.steps",
           "100000", "--checkpoint.enable", "--checkpoint.interval", "1", "--checkpoint.async_mode",
           "async_with_pinned_mem"]
    ranks = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
        ranks.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True))
    writers: list[int] = []
    try:
        writers += _wait_for(lambda: _writers(ranks[1].pid), "rank 1's writer process", ranks[1])
        os.kill(writers[0], signal.SIGSTOP)
        writer = _wait_for(lambda: _writers(ranks[0].pid), "rank 0's writer process", ranks[0])[0]
        writers.append(writer)
        time.sleep(0.5)  # let it get into its process group's set-up, where it waits for rank 1's writer
        os.kill(ranks[0].pid, signal.SIGKILL)
        ranks[0].wait(timeout=30)
        assert not _gone_within([writer], GRACE_S), f"writer {writer} outlived its trainer: {_cmdline(writer)}"
    finally:
        for p in ranks:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # rank 1 with its stopped writer (in its session)
            p.wait(timeout=30)
        for pid in writers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_sigterm_while_waiting_for_other_nodes_exits_at_once():
    """--nnodes 2 with one node started: SIGTERM has no worker to reach; the launcher ends with one line, 143."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "savepoint.launch", "--nnodes", "2", "--node_rank", "0", "--nproc_per_node", "1",
         "--rdzv_backend", "c10d", "--rdzv_endpoint", f"localhost:{port}", "-m", "savepoint", "train",
         "--training.steps", "1"], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def store_up() -> bool:  # the rendezvous store accepts connections: the launcher waits for node 1
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    try:
        _wait_for(store_up, "the rendezvous store", proc)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == launch.EXIT_TERMINATED == 143, err
    assert "Traceback" not in err and "RendezvousTimeoutError" not in err, err
    lines = [ln for ln in err.splitlines() if "SIGTERM" in ln]
    assert lines == ["savepoint: SIGTERM with no worker running (waiting for the other nodes to join): nothing to "
                     "checkpoint; exiting with status 143"], err
    assert err.strip().splitlines()[-1] == lines[0]


def test_a_failed_rank_whose_output_is_hidden_is_named_with_how_to_see_it(tmp_path):
    """LOG_RANK=0 hides rank 1's output: when rank 1 fails, the last line says how to see its error."""
    script = tmp_path / "fail_on_rank1.py"
    script.write_text("import os, sys, time\n"
                      "if os.environ['RANK'] == '1':\n"
                      "    print('rank 1 went wrong', file=sys.stderr)\n"
                      "    sys.exit(3)\n"
                      "time.sleep(60)\n")
    result = subprocess.run(
        [sys.executable, "-m", "savepoint.launch", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "--local-ranks-filter", "0", "--tee", "3", str(script)],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr
    assert "rank 1 went wrong" not in result.stderr + result.stdout
    assert result.stderr.strip().splitlines()[-1] == (
        "savepoint: rank 1 failed with exit code 3; its output is not shown here (LOG_RANK=0): rerun with "
        "LOG_RANK=0,1 to see its error (rerun with SAVEPOINT_DEBUG=1 for a traceback)")


def test_a_restarted_worker_group_joins_a_fresh_process_group_and_the_restart_is_one_line(tmp_path):
    """--max-restarts 1: rank 1 fails after the group's first collectives; the launcher names it and the restart
    in one line, and the new group joins its process group. (Plain torchrun 2.13 hands the new group the store of
    the dead one, where it finds the dead group's gloo addresses: after a new_group, as savepoint's device mesh
    makes, its rank 0 fails with "connectFullMesh failed ... Connection refused", or waits for them until the
    init timeout.)"""
    script = tmp_path / "fail_once.py"
    script.write_text("import datetime, os, sys\n"
                      "import torch, torch.distributed as dist\n"
                      "dist.init_process_group('gloo', timeout=datetime.timedelta(seconds=20))\n"
                      "t = torch.ones(1)\n"
                      "dist.all_reduce(t, group=dist.new_group([0, 1]))\n"
                      "attempt = os.environ['TORCHELASTIC_RESTART_COUNT']\n"
                      "print(f'rank {dist.get_rank()} attempt {attempt} sum {t.item():g}', flush=True)\n"
                      "if attempt == '0' and dist.get_rank() == 1:\n"
                      "    os._exit(3)\n"
                      "dist.barrier() if attempt != '0' else None\n"
                      "dist.destroy_process_group()\n")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "savepoint.launch", "--nproc_per_node", "2", "--rdzv_backend", "c10d",
         "--rdzv_endpoint", "localhost:0", "--max-restarts", "1", "--monitor-interval", "0.1", "--tee", "3",
         str(script)], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=240)
    took = time.monotonic() - started
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("savepoint:")]
    assert lines == ["savepoint: rank 1 failed (exit code 3); restarting every worker (restart 1 of 1); they "
                     "resume from the newest checkpoint"], out[-3000:]
    assert "rank 0 attempt 1 sum 2" in out and "rank 1 attempt 1 sum 2" in out, out[-3000:]
    assert took < 20 + 60, f"the restarted group waited for its process group ({took:.0f} s)"


def test_the_first_failure_is_the_one_that_caused_the_others():
    """torchrun stamps failures in whole seconds and records the workers it stopped itself too: within a
    second, a kill by a signal other than SIGTERM comes first, then a non-zero exit, then SIGTERM."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    def failure(rank: int, code: int, when: int) -> ProcessFailure:
        f = ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code, error_file="")
        f.timestamp = when
        return f

    same_second = {0: failure(0, 1, 50), 1: failure(1, -signal.SIGKILL, 50), 2: failure(2, -signal.SIGTERM, 50)}
    assert launch.first_failure(same_second)[0] == 1
    assert launch.first_failure({0: failure(0, -signal.SIGTERM, 50), 1: failure(1, 1, 50)})[0] == 1
    assert launch.first_failure({0: failure(0, 1, 49), 1: failure(1, -signal.SIGKILL, 50)})[0] == 0
    assert launch.describe_exit(failure(0, -signal.SIGKILL, 1)) == "killed by SIGKILL"
    assert launch.describe_exit(failure(0, 3, 1)) == "exit code 3"
