"""Several nodes: ``NNODES=2 NODE_RANK=0|1 MASTER_ADDR=... MASTER_PORT=... ./run_train.sh``, end to end.

Two launches on this machine act as two nodes of one process each (gloo on CPU, the debug model):
they train, save and resume together, and every loss is bit-identical to one single-node NGPU=2
run of the same job (FSDP 2 both times). Two "nodes" that save into different folders (each
started in a folder of its own with a relative ``--job.dump_folder``) stop before the first step
with the shared-storage check's one line. Bad NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT and
RDZV_ID values are refused with one line each, before any process starts, and so is a rendezvous
port another process holds.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.s3server import s3_env, s3_server  # noqa: F401  (the session's S3 server)
from tests.trials.folder import compare_losses, read_folder, read_losses, verify_folder

STEPS, FIRST = 6, 3  # the first pair of launches trains to step 3 (saved), the second resumes to 6
JOB = ["--training.seq_len", "16", "--training.local_batch_size", "1", "--lr_scheduler.warmup_steps", "2",
       "--checkpoint.enable", "--checkpoint.interval", str(FIRST), "--checkpoint.keep_latest_k", "2",
       "--checkpoint.no_last_save_model_only", "--metrics.log_freq", "1"]
TIMEOUT_S = 300
RUN_TRAIN = str(ROOT / "run_train.sh")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {"OMP_NUM_THREADS": "1", **os.environ, "SAVEPOINT_PYTHON": sys.executable}
    for name in ("NGPU", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "RDZV_ID", "MAX_RESTARTS"):
        env.pop(name, None)
    return {**env, **extra}


def _launch(cwd: Path, log: Path, args: list[str], **extra: str) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([RUN_TRAIN, *args], cwd=cwd, env=_env(**extra), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def _two_nodes(cwds: list[Path], logs: list[Path], args: list[str], **extra: str) -> list[tuple[int, str]]:
    """Start node 1, then node 0 (the order must not matter), as NNODES=2 on 127.0.0.1; wait for both."""
    port = str(_free_port())
    procs = {rank: _launch(cwds[rank], logs[rank], args, NGPU="1", NNODES="2", NODE_RANK=str(rank),
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **extra) for rank in (1, 0)}
    try:
        for proc in procs.values():
            proc.wait(timeout=TIMEOUT_S)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # its workers die with it
                proc.wait()
    return [(procs[rank].returncode, logs[rank].read_text(errors="replace")) for rank in (0, 1)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    """The losses of one single-node NGPU=2 run of the whole job."""
    dump = tmp_path_factory.mktemp("multinode") / "reference"
    dump.mkdir()
    proc = _launch(ROOT, dump / "out.log", ["--job.dump_folder", str(dump), *JOB, "--training.steps", str(STEPS)],
                   NGPU="2")
    proc.wait(timeout=TIMEOUT_S)
    out = (dump / "out.log").read_text(errors="replace")
    assert proc.returncode == 0, out[-3000:]
    assert "from step 0 to 6 on cpu, FSDP 2" in out, out[-3000:]
    records = dict(read_losses(dump)[0])
    assert sorted(records) == list(range(1, STEPS + 1)), out[-3000:]
    return records


def test_two_nodes_train_save_and_resume_together_bit_exact(tmp_path, reference):
    dump = tmp_path / "job"
    dump.mkdir()
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    args = ["--job.dump_folder", str(dump), *JOB]
    first = _two_nodes([ROOT, ROOT], logs, [*args, "--training.steps", str(FIRST)])
    assert [code for code, _ in first] == [0, 0], first[0][1][-3000:] + first[1][1][-3000:]
    assert read_folder(dump / "checkpoint").committed == [FIRST]
    second = _two_nodes([ROOT, ROOT], logs, [*args, "--training.steps", str(STEPS)])
    assert [code for code, _ in second] == [0, 0], second[0][1][-3000:] + second[1][1][-3000:]
    # NODE_RANK numbers the nodes (though node 1 started first): node 0 runs global rank 0, node 1 rank 1.
    for rank, (_, out) in enumerate(first + second):
        assert f"joined process group: rank {rank % 2} of 2" in out, out[-3000:]
    assert f"from step {FIRST} to {STEPS} on cpu, FSDP 2" in second[0][1], second[0][1][-3000:]
    records, _ = read_losses(dump)
    assert sorted(step for step, _ in records) == list(range(1, STEPS + 1)), records
    assert compare_losses(records, reference) == []
    state = read_folder(dump / "checkpoint")
    assert state.committed == [FIRST, STEPS] and not state.hidden and not state.incomplete, state
    assert verify_folder(dump / "checkpoint", state) == []


def test_nodes_saving_into_different_folders_stop_before_the_first_step(tmp_path):
    """Each node starts in a folder of its own with ``--job.dump_folder out``: rank 1 cannot see rank 0's probe."""
    cwds = [tmp_path / f"node{rank}" for rank in (0, 1)]
    for cwd in cwds:
        cwd.mkdir()
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    results = _two_nodes(cwds, logs, ["--job.dump_folder", "out", *JOB, "--training.steps", str(STEPS)])
    host = socket.gethostname()
    expected = re.compile(
        rf"the checkpoint folder is not shared between ranks: rank 0 on host {re.escape(host)} saves into "
        rf"{re.escape(str(cwds[0] / 'out' / 'checkpoint'))}, but rank 1 on host {re.escape(host)} saves into "
        rf"{re.escape(str(cwds[1] / 'out' / 'checkpoint'))}, and it does not see the file \.savepoint\.probe-\w+ "
        r"rank 0 just wrote there .* stopping before the first step\. .*at the same path on every node$")
    for rank, (code, out) in enumerate(results):
        assert code != 0, out[-3000:]
        lines = [ln for ln in out.splitlines() if "not shared between ranks" in ln]
        assert len(lines) == 1 and expected.search(lines[0]), out[-3000:]
        assert "Traceback" not in out, out[-3000:]
        assert out.strip().splitlines()[-1].startswith(f"savepoint: rank {rank} failed with exit code 1"), out[-3000:]
    for cwd in cwds:
        root = cwd / "out" / "checkpoint"
        assert read_losses(cwd / "out")[0] == []  # not one step trained
        if root.exists():
            assert read_folder(root).committed == [] and not list(root.glob(".savepoint.probe-*"))


def test_two_nodes_without_a_shared_filesystem_checkpoint_to_s3(tmp_path, reference, s3_env):  # noqa: F811
    """Node-local dump folders, one ``s3://`` checkpoint folder (saved by background writer processes): the nodes
    save and resume together, bit-exact."""
    from savepoint.checkpoint.object_folder import ObjectFolder, listing
    from savepoint.checkpoint.object_io import ObjectReader

    url = f"s3://{s3_env.make_bucket()}/run"
    cwds = [tmp_path / f"node{rank}" for rank in (0, 1)]
    for cwd in cwds:
        cwd.mkdir()
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    args = ["--job.dump_folder", "out", "--checkpoint.folder", url, "--checkpoint.async_mode", "async_with_pinned_mem",
            *JOB]
    for steps in (FIRST, STEPS):
        results = _two_nodes(cwds, logs, [*args, "--training.steps", str(steps)], **s3_env.env())
        assert [code for code, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    assert f"from step {FIRST} to {STEPS} on cpu, FSDP 2" in results[0][1], results[0][1][-3000:]
    records, _ = read_losses(cwds[0] / "out")
    assert sorted(step for step, _ in records) == list(range(1, STEPS + 1)), records
    assert compare_losses(records, reference) == []
    folder = ObjectFolder(url)
    assert folder.committed_steps() == [FIRST, STEPS]
    for step in (FIRST, STEPS):
        assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "manifest.json"} == set(listing(folder.step_dir(step)))
        reader = ObjectReader.for_step(folder.step_dir(step))
        assert reader.verified and reader.read_metadata().state_dict_metadata
    assert not (cwds[0] / "out" / "checkpoint").exists() and not (cwds[1] / "out" / "checkpoint").exists()


def test_a_rendezvous_port_in_use_is_one_line(tmp_path):
    """Node 0 cannot host the rendezvous on a port something else holds (a second node 0, another job)."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([RUN_TRAIN, "--job.dump_folder", str(tmp_path / "out"), *JOB, "--training.steps", "1"],
                              cwd=ROOT, env=_env(NNODES="2", NODE_RANK="0", MASTER_ADDR="127.0.0.1",
                                                 MASTER_PORT=str(port)), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: cannot host the job's rendezvous at 127.0.0.1:{port}: the port is in use on this node (another "
        "job, or another node started as node 0 here); give a free port (MASTER_PORT of run_train.sh), the same "
        "on every node, and one node 0 (NODE_RANK=0)"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("env", "line"), [
    ({"NNODES": "0"}, "error: NNODES=0: give the number of nodes"),
    ({"NNODES": "two"}, "error: NNODES=two: give the number of nodes"),
    ({"NNODES": "2", "NODE_RANK": "0"}, "error: NNODES=2 needs MASTER_PORT: "),
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_PORT": "29500"}, "error: NODE_RANK=2: give this node's number among "
     "the NNODES=2 node(s), 0 to 1"),
    ({"NNODES": "2", "NODE_RANK": "-1", "MASTER_PORT": "29500"}, "error: NODE_RANK=-1: "),
    ({"NODE_RANK": "1"}, "error: NODE_RANK=1: give this node's number among the NNODES=1 node(s), 0 to 0"),
    ({"NNODES": "2", "MASTER_PORT": "http"}, "error: MASTER_PORT=http: give a free TCP port of node 0"),
    ({"NNODES": "2", "MASTER_PORT": "70000"}, "error: MASTER_PORT=70000: "),
    ({"NNODES": "2", "MASTER_PORT": "0"}, "error: MASTER_PORT=0: "),
    ({"MASTER_ADDR": "node 0"}, "error: MASTER_ADDR=node 0: give the host name or IP address of node 0"),
    ({"RDZV_ID": "my job"}, "error: RDZV_ID=my job: give the job's name in the rendezvous"),
], ids=["nnodes-0", "nnodes-word", "no-port", "rank-too-big", "rank-negative", "rank-one-node", "port-word",
        "port-too-big", "port-0", "addr-space", "rdzv-id-space"])
def test_bad_multinode_settings_are_refused_with_one_line(tmp_path, env, line):
    proc = subprocess.run([RUN_TRAIN, "--job.dump_folder", str(tmp_path), "--training.steps", "1"], cwd=ROOT,
                          env=_env(**env), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(line), proc.stderr
    assert not any(tmp_path.iterdir())
