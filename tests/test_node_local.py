"""Node-local checkpoint folders: a job whose ranks save into different folders stops before its first step.

Two torchrun launches on this machine act as two nodes (``--nnodes 2 --node_rank 0|1``), each
given its own ``--job.dump_folder``, as node-local disks would be. One spawn runs every scenario:
sync, both async modes, the Hugging Face export, a restart on the same folders, a control run on
one shared folder; the last one goes through the CLI, so the exit status and error line are real.

Run as a script (``python tests/test_node_local.py BASE``), this file is the worker of that spawn.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script, this file imports tests.conftest

from tests.conftest import FAST_ARGS  # noqa: E402

SHORT = ["--training.steps", "4", "--checkpoint.interval", "2"]
HF_FINAL = ["--training.steps", "2", "--checkpoint.interval", "100", "--checkpoint.last_save_model_only",
            "--checkpoint.last_save_in_hf"]
# name -> arguments; each runs with node-local folders (BASE/node<rank>/<name>) unless named "shared".
SCENARIOS = {
    "sync": SHORT,
    "async": [*SHORT, "--checkpoint.async_mode", "async"],
    "pinned": [*SHORT, "--checkpoint.async_mode", "async_with_pinned_mem"],
    "hf": HF_FINAL,
    "sync_again": SHORT,  # restarts "sync" on the folders it left
    "shared": SHORT,  # control: one folder for both ranks
}
CLI_ARGS = ["train", "--job.config_file", str(ROOT / "configs/debug_model.toml"), *FAST_ARGS, *SHORT]


# ---- the worker (one per "node") ------------------------------------------------------------------

def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != ".savepoint.lock") if folder.is_dir() else []


def _scenario(base: Path, rank: int, name: str, args: list[str], saved: list[str]) -> dict:
    from savepoint.errors import SavepointError
    from savepoint.train import Trainer
    from tests.conftest import make_config

    dump = base / "shared" if name == "shared" else base / f"node{rank}" / name.replace("_again", "")
    trainer = None
    try:
        trainer = Trainer(make_config(dump, *args))
        trainer.train()
        trainer.checkpointer.close()
        outcome = "finished"
    except SavepointError as e:
        outcome = f"{type(e).__name__}: {e}"
        if trainer is not None:
            trainer.checkpointer.close()  # nothing in flight: only frees its process groups
    except BaseException as e:  # anything else is the bug this test is about
        outcome = f"{type(e).__name__}: {e}"
    finally:
        if trainer is not None and trainer.checkpointer.lock is not None:
            trainer.checkpointer.lock.release()
    return {"outcome": outcome, "entries": _entries(dump / "checkpoint"), "saved": list(saved)}


def worker(base: Path) -> int:
    import torch.distributed as dist

    from savepoint import cli
    from savepoint.config.job_config import Comm
    from savepoint.distributed import init_distributed

    init_distributed(Comm())
    rank = dist.get_rank()
    saved: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: saved.append(record.getMessage()) if "saved step" in record.getMessage() else None
    logging.getLogger("savepoint").addHandler(handler)
    logging.getLogger("savepoint").setLevel(logging.INFO)
    results = {}
    for name, args in SCENARIOS.items():
        saved.clear()
        results[name] = _scenario(base, rank, name, args, saved)
        dist.barrier()
    logging.getLogger("savepoint").removeHandler(handler)
    (base / f"result{rank}.json").write_text(json.dumps(results, indent=1))
    # Last, the real command (on the same process group): its exit status and stderr line are what a user sees.
    return cli.main([*CLI_ARGS, "--job.dump_folder", str(base / f"node{rank}" / "cli")])


# ---- the test ------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory) -> tuple[Path, list[subprocess.CompletedProcess]]:
    base = tmp_path_factory.mktemp("nodes")
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("SAVEPOINT_DEBUG", None)
    procs = [subprocess.Popen(
        [sys.executable, "-m", "savepoint.launch", "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node",
         "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"localhost:{port}", __file__, str(base)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    for rank in (0, 1):
        assert (base / f"result{rank}.json").is_file(), done[rank].stdout[-3000:] + done[rank].stderr[-5000:]
    return base, done


def _results(base: Path) -> list[dict]:
    return [json.loads((base / f"result{rank}.json").read_text()) for rank in (0, 1)]


def _not_shared(base: Path, name: str) -> str:
    host = socket.gethostname()
    return (f"the checkpoint folder is not shared between ranks: rank 0 on host {host} saves into "
            f"{base}/node0/{name}/checkpoint, but rank 1 on host {host} saves into {base}/node1/{name}/checkpoint")


@pytest.mark.parametrize("name", ["sync", "async", "pinned", "hf", "sync_again"])
def test_node_local_folders_stop_the_job_and_commit_nothing(two_nodes, name):
    base, _ = two_nodes
    folder = name.replace("_again", "")
    for rank, result in enumerate(_results(base)):
        got = result[name]
        assert got["outcome"].startswith("FatalCheckpointError: " + _not_shared(base, folder)), (rank, got)
        assert "shared by every node" in got["outcome"] and "--job.dump_folder" in got["outcome"]
        assert "stopping before the first step" in got["outcome"]  # the start-up probe, not the first save
        assert got["entries"] == [], (rank, got["entries"])  # no step, no staging folder left on either node
        assert got["saved"] == []


def test_cli_exits_non_zero_on_every_rank_with_one_line(two_nodes):
    base, procs = two_nodes
    for rank, proc in enumerate(procs):
        assert proc.returncode == 1, proc.stderr[-3000:]
        errors = [line for line in proc.stderr.splitlines() if "error: " in line]
        prefix = "error: " if rank == 0 else "[rank1] error: "
        assert len(errors) == 1 and errors[0].startswith(prefix + _not_shared(base, "cli")), proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr


def test_shared_folder_commits_and_every_rank_logs_the_step_size(two_nodes):
    from savepoint.checkpoint.verify import verify_step

    base, _ = two_nodes
    results = _results(base)
    assert [r["shared"]["outcome"] for r in results] == ["finished", "finished"]
    assert results[0]["shared"]["entries"] == ["step-2", "step-4"]
    for step in (2, 4):
        assert verify_step(base / "shared/checkpoint" / f"step-{step}").ok
    sizes = []
    for result in results:
        line = next(m for m in result["shared"]["saved"] if m.startswith("saved step 4 "))
        sizes.append(line.split(": ", 1)[1].split(" GB", 1)[0])
        assert "this rank wrote 0.0" in line
    assert sizes[0] == sizes[1] and float(sizes[0]) > 0  # the step's size, on rank 1 too


def test_resume_from_a_step_missing_a_rank_shard_falls_back(two_nodes, tmp_path, train):
    """A step committed without rank 1's shard (as before this check existed) counts as corrupt."""
    import shutil

    from savepoint.checkpoint.manifest import manifest_bytes

    base, _ = two_nodes
    shutil.copytree(base / "shared", tmp_path / "run")
    step4 = tmp_path / "run/checkpoint/step-4"
    (step4 / "__1_0.distcp").unlink()
    manifest = json.loads((step4 / "manifest.json").read_text())
    del manifest["files"]["__1_0.distcp"], manifest["checksums"]["files"]["__1_0.distcp"], manifest["manifest_checksum"]
    (step4 / "manifest.json").write_bytes(manifest_bytes(manifest))
    trainer = train("--training.local_batch_size", "4", "--training.steps", "4", stop_after=2)
    assert trainer.train_state.step == 2  # fell back from the damaged step-4 to step-2


if __name__ == "__main__":
    sys.exit(worker(Path(sys.argv[1])))
