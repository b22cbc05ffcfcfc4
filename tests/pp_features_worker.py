"""Checkpoint features under pipeline parallelism, for tests/test_pipeline_features.py (torchrun, gloo, CPU).

    python -m torch.distributed.run --nproc_per_node=2 tests/pp_features_worker.py BASE SCENARIO[,SCENARIO...]

Every job runs at PP(2) (two ranks, two stages each: Interleaved1F1B, no data parallelism) on a
global batch of 4 samples, 4 microbatches of 1. One launch runs the scenarios in a row, each with
its own Trainer in ``BASE/<scenario>/``; rank 0 writes what the tests check there: ``final.pt`` /
``loaded.pt`` (the whole model and optimizer state, gathered from both stages), ``result.json``
(what each rank saw) and ``rank<R>.log`` (each rank's savepoint log; a restart's goes to
``resumed.rank<R>.log``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from savepoint.config.job_config import Comm  # noqa: E402
from savepoint.distributed import init_distributed  # noqa: E402
from savepoint.train import Trainer  # noqa: E402
from tests.conftest import make_config  # noqa: E402
from tests.dist_worker import barrier, rank0, save  # noqa: E402

PP = ["--parallelism.pipeline_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "1",
      "--parallelism.pipeline_parallel_schedule", "Interleaved1F1B", "--training.local_batch_size", "4"]
# 5 steps: interval saves at 2 and 4, the final save at 5.
JOB = [*PP, "--training.steps", "5", "--checkpoint.interval", "2"]
KEEP_TWO = ["--checkpoint.keep_latest_k", "2"]
NO_INTERVAL = ["--checkpoint.interval", "10"]
PREEMPTED_AT = 3
DAMAGED = "__1_0.distcp"  # rank 1's file: the second stage's tensors


def trainer_for(out: Path, *extra: str, log: str = "") -> Trainer:
    """A PP(2) trainer of ``JOB`` + ``extra`` in ``out``; its log goes to ``out/<log>rank<R>.log``."""
    out.mkdir(parents=True, exist_ok=True)
    _log_to(out / f"{log}rank{dist.get_rank()}.log")
    return Trainer(make_config(out, *JOB, *extra))


def _log_to(path: Path) -> None:
    """This rank's savepoint log (INFO and up) goes to ``path`` too, for the scenario that runs now."""
    log = logging.getLogger("savepoint")
    for handler in [h for h in log.handlers if getattr(h, "pp_scenario", False)]:
        log.removeHandler(handler)
        handler.close()
    handler = logging.FileHandler(path)
    handler.pp_scenario = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def gathered(trainer: Trainer) -> dict[str, dict[str, torch.Tensor]]:
    """The whole model and flattened optimizer state: each stage's tensors, gathered from both ranks.

    Skips the optimizer while it has no state: asking a fresh optimizer for its state dict makes
    torch initialise it (a zero step), which would change the run.
    """
    opts = StateDictOptions(full_state_dict=True, flatten_optimizer_state_dict=True)
    model = get_model_state_dict(trainer.model, options=opts)
    mine = {"model": {k: v.detach().cpu().clone() for k, v in model.items()}, "optimizer": {}}
    if trainer.optimizer.state:
        optim = get_optimizer_state_dict(trainer.model, trainer.optimizer, options=opts)
        mine["optimizer"] = {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v
                             for k, v in optim.items()}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    merged: dict[str, dict] = {"model": {}, "optimizer": {}}
    for part in everyone:
        for kind in merged:
            for key, value in part[kind].items():
                # param_groups entries name every rank's parameters; tensors exist on one stage only
                merged[kind].setdefault(key, value)
    return merged


def per_rank(value) -> list:
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, value)
    return everyone


def write_result(out: Path, result: dict) -> None:
    if rank0():
        (out / "result.json").write_text(json.dumps(result))


def copy_folder(src: Path, dst: Path) -> None:
    """A fresh run folder holding ``src``'s checkpoint folder (every committed step)."""
    if rank0():
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src / "checkpoint", dst / "checkpoint", ignore=shutil.ignore_patterns(".savepoint.lock"))
    barrier()


LOCK_ATTEMPT = "from savepoint.checkpoint.lock import FolderLock; import sys; FolderLock(sys.argv[1]).acquire()"


def straight(base: Path) -> None:
    """Sync saves at steps 2, 4 and 5 (the final save, full); record the final state. While the job
    holds its folder, another process trying to lock the folder is refused."""
    out = base / "straight"
    trainer = trainer_for(out)
    trainer.train()
    if rank0():
        other = subprocess.run([sys.executable, "-c", LOCK_ATTEMPT, str(out / "checkpoint")], cwd=ROOT,
                               capture_output=True, text=True, timeout=120)
        write_result(out, {"other_exit": other.returncode, "other_error": other.stderr.strip().splitlines()[-1],
                           "pid": os.getpid()})
    trainer.checkpointer.close()
    save(gathered(trainer), out / "final.pt")


def straight_async(base: Path, mode: str) -> None:
    """``straight`` with async saves (step 4 is written while step 5 trains) keeping 2 steps."""
    out = base / mode
    trainer = trainer_for(out, "--checkpoint.async_mode", mode, *KEEP_TWO)
    trainer.train()
    trainer.checkpointer.close()
    write_result(out, {"step": per_rank(trainer.train_state.step)})


def model_only(base: Path) -> None:
    """The final save model-only in bfloat16; record the float32 weights it was made from."""
    out = base / "model_only"
    trainer = trainer_for(out, "--training.steps", "3", "--checkpoint.interval", "10",
                          "--checkpoint.last_save_model_only", "--checkpoint.export_dtype", "bfloat16")
    trainer.train()
    trainer.checkpointer.close()
    save(gathered(trainer)["model"], out / "final.pt")


def damage(path: Path) -> None:
    """Flip one bit inside a stored tensor of ``path`` (its size stays)."""
    if rank0():
        with open(path, "r+b") as f:
            f.seek(path.stat().st_size // 2)
            byte = f.read(1)[0]
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte ^ 0x10]))
    barrier()


def fallback(base: Path) -> None:
    """The latest step (5) has a damaged file: auto-resume falls back to step 4 and trains step 5 again."""
    out = base / "fallback"
    copy_folder(base / "straight", out)
    damage(out / "checkpoint" / "step-5" / DAMAGED)
    trainer = trainer_for(out, *KEEP_TWO)
    loaded = trainer.load_checkpoint()
    state = {"loaded": per_rank(loaded), "optimizer_entries": per_rank(len(trainer.optimizer.state))}
    trainer.train()
    trainer.checkpointer.close()
    write_result(out, state)
    save(gathered(trainer), out / "final.pt")


def partial(base: Path) -> None:
    """``--checkpoint.load_step 4`` (step 5 is newer) without the dataloader and the optimizer."""
    out = base / "partial"
    copy_folder(base / "straight", out)
    trainer = trainer_for(out, "--checkpoint.load_step", "4", "--checkpoint.exclude_from_loading",
                          "dataloader,optimizer")
    loaded = trainer.load_checkpoint()
    state = {"loaded": per_rank(loaded), "optimizer_entries": per_rank(len(trainer.optimizer.state)),
             "train_step": per_rank(trainer.train_state.step),
             "lr_steps": per_rank(trainer.lr_scheduler.last_epoch),
             "sample_index": per_rank(trainer.dataloader.sample_index)}
    save(gathered(trainer), out / "loaded.pt")
    trainer.train()
    trainer.checkpointer.close()
    write_result(out, state)


def preempt(base: Path) -> None:
    """SIGTERM to rank 1 alone during step 3: both stages stop after step 3 and commit it; a restart resumes."""
    out = base / "preempt"
    original = Trainer.train_step

    def train_step(self):
        if self.train_state.step == PREEMPTED_AT and dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self)

    Trainer.train_step = train_step
    try:
        trainer = trainer_for(out, *NO_INTERVAL)
        trainer.train()
        trainer.checkpointer.close()
    finally:
        Trainer.train_step = original
    stopped = per_rank(trainer.train_state.step)
    barrier()
    resumed = trainer_for(out, *NO_INTERVAL, log="resumed.")
    resumed.train()
    resumed.checkpointer.close()
    write_result(out, {"stopped": stopped, "resumed_from": per_rank(resumed.loaded_step)})
    save(gathered(resumed), out / "final.pt")


def locked(base: Path) -> None:
    """Another process holds ``locked/checkpoint``'s lock: the PP job is refused on both ranks, writing nothing."""
    from savepoint.errors import SavepointError

    out = base / "locked"
    try:
        trainer_for(out)
        error = None
    except SavepointError as e:
        error = f"{type(e).__name__}: {e}"
    write_result(out, {"errors": per_rank(error)})


SCENARIOS = {"straight": straight, "model_only": model_only, "fallback": fallback, "partial": partial,
             "preempt": preempt, "locked": locked}


def main(base: str, scenarios: str) -> None:
    init_distributed(Comm())
    for scenario in scenarios.split(","):
        kind, _, arg = scenario.partition(":")
        if kind == "async":
            straight_async(Path(base), arg)
        else:
            SCENARIOS[kind](Path(base))
        barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
