"""In-memory tier scenarios at two processes (FSDP 2), for tests/test_memory_tier_distributed.py (torchrun, gloo).

    python -m torch.distributed.run --nproc_per_node=2 tests/memory_worker.py BASE

Each scenario trains to a step and stops without closing (the RAM copies stay, as after a crash;
the save in flight is committed first), changes the RAM copies as the scenario says, restarts
and trains to the end. Rank 0 writes ``BASE/results.json``: per scenario the step the restart
loaded, its losses, and whether its final model and optimizer equal the uninterrupted run's.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
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

STEPS = 8
ARGS = ["--training.steps", str(STEPS), "--checkpoint.interval", "4", "--training.local_batch_size", "2"]


def full_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, flatten_optimizer_state_dict=True)
    model = get_model_state_dict(trainer.model, options=opts)
    optim = get_optimizer_state_dict(trainer.model, trainer.optimizer, options=opts)
    return {**{f"model.{k}": v for k, v in model.items()},
            **{f"optim.{k}": v for k, v in optim.items() if isinstance(v, torch.Tensor)}}


def losses(dump: Path) -> dict[int, float]:
    lines = (dump / "metrics.jsonl").read_text().splitlines()
    return {rec["step"]: rec["loss"] for rec in map(json.loads, lines)}


def run(dump: Path, args: list[str], stop_after: int | None = None, keep_up: bool = True) -> Trainer:
    trainer = Trainer(make_config(dump, *ARGS, *args))
    tier = trainer.checkpointer.memory
    if not keep_up and tier is not None:
        # A writer that cannot keep up however fast this machine writes (or slow it trains): each RAM
        # save takes at least half a second, and a step takes much less.
        start = tier.saver.start

        def slow_start(step: int, kind: str, staging: Path, state: dict, planner: object, writer: object) -> None:
            write_data = writer.write_data  # runs on the writer thread

            def slow_write(plan: object, save_planner: object) -> object:
                time.sleep(0.5)
                return write_data(plan, save_planner)

            writer.write_data = slow_write
            start(step, kind, staging, state, planner, writer)

        tier.saver.start = slow_start
    if keep_up and tier is not None:
        # Each RAM save finishes before the next step's verdict, as a writer faster than a step would;
        # the debug model's steps take milliseconds, so due saves would otherwise be skipped ("skipping").
        tier.idle = lambda: tier.saver.inflight is None or tier.saver.wait() is None or True
    trainer.train(stop_after=stop_after)
    if stop_after is None:
        trainer.checkpointer.close()
    else:  # a crash: nothing is closed; the RAM save in flight is committed as if the crash came later
        trainer.checkpointer.memory.finish()
        if trainer.checkpointer.lock is not None:
            trainer.checkpointer.lock.release()
    dist.barrier()
    return trainer


def rank_folder(shm: Path) -> Path:
    (run_dir,) = [p for p in shm.iterdir() if p.is_dir()]
    return run_dir / f"rank-{dist.get_rank()}"


def damage(step_dir: Path) -> None:
    data = sorted(step_dir.glob("*.distcp"))[0]
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    data.write_bytes(bytes(raw))


def bind_run_file(root: Path) -> None:
    """A copied folder is another run: bind the copy's run file to it, so that it stands for the crashed job."""
    import os

    record = json.loads((root / ".savepoint.run").read_text())
    st = os.stat(root)
    (root / ".savepoint.run").write_text(json.dumps({**record, "folder": [str(root), st.st_dev, st.st_ino]}))


def on_rank1(fn, shm: Path) -> None:
    if dist.get_rank() == 1:
        fn(shm)
    dist.barrier()


# name -> (extra args, crash at, what happens to the RAM copies before the restart, the crashed job it copies)
SCENARIOS = {
    "skipping": ([], 7, None, None),  # the writer does not keep up: both ranks skip the same due saves
    "newer": ([], 7, None, None),
    "rank1_lost_newest": ([], 7, lambda shm: shutil.rmtree(rank_folder(shm) / "step-7"), "newer"),
    "rank1_damaged": ([], 7, lambda shm: [damage(p) for p in sorted(rank_folder(shm).glob("step-*"))], "newer"),
    "rank1_rebooted": ([], 7, lambda shm: shutil.rmtree(rank_folder(shm)), "newer"),
    "pinned": (["--checkpoint.async_mode", "async_with_pinned_mem"], 6, None, None),
    "async": (["--checkpoint.async_mode", "async"], 7, None, None),
    "tp": (["--parallelism.tensor_parallel_degree", "2", "--training.local_batch_size", "4"], 6, None, None),
    "pp": (["--parallelism.pipeline_parallel_degree", "2", "--training.local_batch_size", "4"], 6, None, None),
}
# Layouts other than FSDP(2) compare with an uninterrupted run of their own.
OWN_LAYOUT = ("tp", "pp")


def crash_args(shm: Path, extra: list[str], interval: int = 1) -> list[str]:
    return ["--checkpoint.enable", "--checkpoint.memory_interval", str(interval), "--checkpoint.memory_folder",
            str(shm), *extra]


def main(base: Path) -> None:
    init_distributed(Comm())
    straight = run(base / "straight", ["--checkpoint.enable"])
    fsdp_state = full_state(straight)
    results: dict[str, dict] = {}
    for name, (extra, at, change, source) in SCENARIOS.items():
        expected = fsdp_state
        if name in OWN_LAYOUT:
            expected = full_state(run(base / f"straight-{name}", ["--checkpoint.enable", *extra]))
        dump, shm = base / name, base / name / "shm"
        if source is None:
            run(dump, crash_args(shm, extra), stop_after=at, keep_up=name != "skipping")
            copies = [n for n, spec in SCENARIOS.items() if spec[3] == name]
            if dist.get_rank() == 0:  # the RAM copies of both ranks live on this one machine
                for copy in copies:
                    shutil.copytree(dump, base / copy)
                    bind_run_file(base / copy / "checkpoint")
                if name == "newer":  # for the one-process restart in the test
                    shutil.copytree(rank_folder(shm) / "step-6", base / "stale-rank-0" / "step-6")
            dist.barrier()
        kept = sorted(p.name for p in rank_folder(shm).glob("step-*"))
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, kept)
        if change is not None:
            on_rank1(change, shm)
        resumed = run(dump, crash_args(shm, extra, interval=100))  # the tier is on, only its load is under test
        got = full_state(resumed)
        equal = got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
        results[name] = {"loaded": resumed.loaded_step, "kept": kept, "same_on_every_rank": everyone[1] == kept,
                         "equal": equal, "ram_left": any(shm.iterdir())}
    if dist.get_rank() == 0:
        straights = {n: losses(base / f"straight-{n}") for n in OWN_LAYOUT}
        (base / "results.json").write_text(json.dumps({"results": results, "straight": losses(base / "straight"),
                                                       "straights": straights,
                                                       "losses": {n: losses(base / n) for n in SCENARIOS}}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
