"""Multi-process scenarios for tests/test_distributed.py, run under torchrun (gloo, CPU).

    python -m torch.distributed.run --nproc_per_node=N tests/dist_worker.py BASE SCENARIO[,SCENARIO...]

Starting processes and importing torch cost more than these tiny jobs, so one launch runs many
scenarios in a row, each with its own Trainer (and its own device mesh) on the same process group.
Each scenario writes what the tests check under ``BASE/<scenario>/`` from rank 0:
``metrics.jsonl`` (losses, from the trainer), ``consumed.json`` (global sample indices each step
actually read, gathered from every rank), ``init.pt`` / ``loaded.pt`` (full model and optimizer
state gathered from the shards) and ``final.pt``.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
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

STEPS = ["--training.steps", "10", "--checkpoint.interval", "5"]
# Every layout consumes a global batch of 4 samples per step, so runs at different layouts see
# the same data and their losses are comparable step by step.
LAYOUTS = {
    "one": ["--training.local_batch_size", "4"],  # 1 process
    "fsdp": ["--training.local_batch_size", "2"],  # 2 processes: dp_shard 2
    "tp": ["--training.local_batch_size", "4", "--parallelism.tensor_parallel_degree", "2"],  # 2 processes
    "hsdp": ["--training.local_batch_size", "2", "--parallelism.data_parallel_replicate_degree", "2"],  # 2x1
    "fsdp_tp": ["--training.local_batch_size", "2", "--parallelism.tensor_parallel_degree", "2"],  # 4: 2x2
}


@contextmanager
def one_thread() -> Iterator[None]:
    """One torch thread for the 1-process jobs the tests run in their own process, as each launched
    process has (OMP_NUM_THREADS=1): a second, spinning thread made these tiny steps slower, up to
    four times next to launched processes on a small machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def full_model(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The whole model, unsharded. Leaves the optimizer alone: asking a fresh optimizer for its state
    dict makes torch initialise it with a zero step, which would change the run."""
    return get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_state(trainer: Trainer) -> dict[str, dict[str, torch.Tensor]]:
    """The whole model and flattened optimizer state, unsharded, on every rank (saved by rank 0)."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, flatten_optimizer_state_dict=True)
    model = get_model_state_dict(trainer.model, options=opts)
    optim = get_optimizer_state_dict(trainer.model, trainer.optimizer, options=opts)
    return {"model": model, "optimizer": optim}


def record_consumption(trainer: Trainer, out: Path) -> None:
    """Wrap the loader so every step's actually read sample indices (all ranks) go to consumed.json."""
    loader = trainer.dataloader
    read = loader.next_batch
    steps: list[list[int]] = []

    def next_batch():
        mine = loader.local_indices()
        everyone = [None] * dist.get_world_size() if dist.is_initialized() else [mine]
        if dist.is_initialized():
            dist.all_gather_object(everyone, mine)
        # TP ranks of one data-parallel group read the same samples: count each group once.
        steps.append(sorted({i for indices in everyone for i in indices}))
        if rank0():
            (out / "consumed.json").write_text(json.dumps(steps))
        return read()

    loader.next_batch = next_batch


def copy_step(src: Path, dst_run: Path, step: int) -> None:
    """Put ``src/checkpoint/step-N`` into a fresh run folder, so its trainer resumes from it."""
    if rank0():
        shutil.rmtree(dst_run, ignore_errors=True)
        shutil.copytree(src / "checkpoint" / f"step-{step}", dst_run / "checkpoint" / f"step-{step}")
    barrier()


def save(obj, path: Path) -> None:
    if rank0():
        torch.save(obj, path)


def straight(base: Path, layout: str) -> None:
    """Train ``layout`` 10 steps (saves at 5 and 10); record the init and the final state."""
    out = base / layout
    trainer = Trainer(make_config(out, *LAYOUTS[layout], *STEPS))
    out.mkdir(parents=True, exist_ok=True)
    save(full_model(trainer), out / "init.pt")
    record_consumption(trainer, out)
    trainer.train()
    save(full_state(trainer), out / "final.pt")


def straight_async(base: Path, mode: str) -> None:
    """The FSDP(2) run of ``straight`` with async saves; closing the checkpointer commits the last one."""
    out = base / f"{mode}_fsdp"
    trainer = Trainer(make_config(out, *LAYOUTS["fsdp"], *STEPS, "--checkpoint.async_mode", mode))
    trainer.train(stop_after=9)
    trainer.checkpointer.close()


def resume(base: Path, source: str, layout: str) -> None:
    """Resume ``source``'s step 5 at ``layout`` (auto-resume): record the loaded state, train to step 10."""
    out = base / f"{source}_to_{layout}"
    copy_step(base / source, out, 5)
    trainer = Trainer(make_config(out, *LAYOUTS[layout], *STEPS))
    assert trainer.load_checkpoint() == 5
    save(full_state(trainer), out / "loaded.pt")
    record_consumption(trainer, out)
    trainer.train()
    save(full_state(trainer), out / "final.pt")


def seeded(base: Path, layout: str) -> None:
    """Load the seed checkpoint (made with another seed) at ``layout``; record the weights."""
    out = base / f"seed_to_{layout}"
    copy_step(base / "seed", out, 0)
    trainer = Trainer(make_config(out, *LAYOUTS[layout], *STEPS))
    assert trainer.load_checkpoint() == 0
    out.mkdir(parents=True, exist_ok=True)
    save(full_model(trainer), out / "loaded.pt")
    trainer.train(stop_after=1)  # a step runs from the seed weights


HF_FINAL = ["--checkpoint.last_save_model_only", "--checkpoint.last_save_in_hf"]


def hf_final(base: Path) -> None:
    """Train at FSDP(2) with the final save as a Hugging Face folder; record the final state."""
    out = base / "hf_fsdp"
    trainer = Trainer(make_config(out, *LAYOUTS["fsdp"], *STEPS, *HF_FINAL))
    trainer.train()
    save(full_state(trainer)["model"], out / "final.pt")


def hf_load(base: Path, layout: str) -> None:
    """Start a run at ``layout`` from that HF folder (initial_load_in_hf); record the loaded weights."""
    out = base / f"hf_to_{layout}"
    source = base / "hf_fsdp" / "checkpoint" / "step-10"
    trainer = Trainer(make_config(out, *LAYOUTS[layout], *STEPS, "--checkpoint.initial_load_path", str(source),
                                  "--checkpoint.initial_load_in_hf"))
    assert trainer.load_checkpoint() == 0
    out.mkdir(parents=True, exist_ok=True)
    save(full_model(trainer), out / "loaded.pt")


def make_seed(base: Path) -> None:
    """A seed checkpoint from another seed (7), so loading it visibly changes the weights."""
    Trainer(make_config(base / "seed", "--checkpoint.create_seed_checkpoint", "--training.seed", "7")
            ).create_seed_checkpoint()


def failed_save(base: Path) -> None:
    """Rank 1's write fails mid-save: every rank must raise, nothing is committed, step-4 is untouched.

    Saves every 2 steps keeping 1, so retention (rank 0 only) has deleted step-2 before that.
    """
    from torch.distributed.checkpoint import FileSystemWriter

    from savepoint.errors import CheckpointError

    out = base / "failsave"
    trainer = Trainer(make_config(out, *LAYOUTS["fsdp"], *STEPS, "--checkpoint.interval", "2",
                                  "--checkpoint.keep_latest_k", "1"))
    trainer.train(stop_after=5)
    step4 = out / "checkpoint" / "step-4"
    before = {p.name: p.read_bytes() for p in step4.iterdir()}
    original = FileSystemWriter.write_data

    def broken_write(self, plan, planner):
        if dist.get_rank() == 1:
            raise OSError("injected: rank 1 lost its disk")
        return original(self, plan, planner)

    FileSystemWriter.write_data = broken_write
    try:
        trainer.checkpointer.save(10, last_step=True)
        error = None
    except CheckpointError as e:
        error = str(e)
    finally:
        FileSystemWriter.write_data = original
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    if rank0():
        (out / "result.json").write_text(json.dumps({
            "errors": errors,
            "entries": sorted(p.name for p in (out / "checkpoint").iterdir() if p.name != ".savepoint.lock"),
            "step4_unchanged": before == {p.name: p.read_bytes() for p in step4.iterdir()},
        }))


def failed_prepare(base: Path) -> None:
    """Failures outside DCP's own error handling must not hang or split the ranks.

    Case "state": rank 1 fails to build its optimizer state, before DCP's first collective.
    Case "begin": rank 0 alone fails to create the staging folder while rank 1 waits for it.
    Every rank must raise, and nothing may be committed.
    """
    from savepoint.errors import CheckpointError

    out = base / "failprep"
    trainer = Trainer(make_config(out, *LAYOUTS["fsdp"], *STEPS))
    trainer.train(stop_after=5)
    ckpt = trainer.checkpointer
    optimizer_state = ckpt.states["optimizer"]
    results = {}
    for case in ("state", "begin"):
        original_state, original_begin = optimizer_state.state_dict, ckpt.folder.begin
        if case == "state" and dist.get_rank() == 1:
            optimizer_state.state_dict = lambda: (_ for _ in ()).throw(RuntimeError("injected: no optimizer state"))
        if case == "begin" and rank0():
            ckpt.folder.begin = lambda step: (_ for _ in ()).throw(OSError(28, "injected: No space left on device"))
        try:
            ckpt.save(10, last_step=True)
            error = None
        except CheckpointError as e:
            error = str(e)
        finally:
            optimizer_state.state_dict, ckpt.folder.begin = original_state, original_begin
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        results[case] = {"errors": errors, "entries": sorted(p.name for p in (out / "checkpoint").iterdir()
                                                            if p.name != ".savepoint.lock")}
    trainer.train(stop_after=6)  # the ranks are still in step with each other: training goes on
    results["trained_to"] = trainer.train_state.step
    if rank0():
        (out / "result.json").write_text(json.dumps(results))


def run_scenario(base: Path, scenario: str) -> None:
    kind, _, arg = scenario.partition(":")
    if kind == "make_seed":
        make_seed(base)
    elif kind == "async":
        straight_async(base, arg)
    elif kind == "hf_final":
        hf_final(base)
    elif kind == "hf_load":
        hf_load(base, arg)
    elif kind == "failed_save":
        failed_save(base)
    elif kind == "failed_prepare":
        failed_prepare(base)
    elif kind == "straight":
        straight(base, arg)
    elif kind == "resume":
        source, layout = arg.split(">")
        resume(base, source, layout)
    elif kind == "seed":
        seeded(base, arg)
    else:
        raise ValueError(f"unknown scenario {scenario}")


def main(base: str, scenarios: str) -> None:
    init_distributed(Comm())  # before any scenario: copy_step needs to know which rank is 0
    for scenario in scenarios.split(","):
        run_scenario(Path(base), scenario)
        barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
