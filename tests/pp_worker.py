"""Pipeline-parallel scenarios for tests/test_pipeline.py, run under torchrun (gloo, CPU).

    python -m torch.distributed.run --nproc_per_node=N tests/pp_worker.py BASE SCENARIO[,SCENARIO...]

As in ``tests/dist_worker.py``, one launch runs many scenarios, each with its own Trainer. Under
PP a rank holds only its stages, so the full state is gathered from every rank (``gathered``)
before rank 0 writes it. Each scenario writes under ``BASE/<name>/``: ``metrics.jsonl``,
``consumed.json`` (the global sample indices each step read), ``init.pt`` / ``loaded.pt`` /
``final.pt`` (the full model and optimizer state) and ``loaded.json`` (the loaded step and every
rank's data loader position).
"""

from __future__ import annotations

import json
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
from tests import dist_worker  # noqa: E402
from tests.conftest import make_config  # noqa: E402
from tests.dist_worker import STEPS, barrier, copy_step, record_consumption, save  # noqa: E402

PP2 = ["--parallelism.pipeline_parallel_degree", "2"]


def pp_layout(schedule: str, local_batch: int = 4, shard: int = 1) -> list[str]:
    """PP(2) x FSDP(``shard``) with ``schedule``; microbatches of 1 sample."""
    return ["--training.local_batch_size", str(local_batch), *PP2, "--parallelism.data_parallel_shard_degree",
            str(shard), "--parallelism.pipeline_parallel_schedule", schedule]


# Every layout reads a global batch of 4 samples per step, as in dist_worker.LAYOUTS.
SCHEDULES = {"gpipe": "GPipe", "1f1b": "1F1B", "i1f1b": "Interleaved1F1B", "loopedbfs": "LoopedBFS",
             "izb": "InterleavedZeroBubble", "zbv": "ZBVZeroBubble", "dualpipev": "DualPipeV"}
LAYOUTS = {
    **dist_worker.LAYOUTS,
    **{f"pp_{short}": pp_layout(name) for short, name in SCHEDULES.items()},  # 2 processes, 4 microbatches
    "pp_fsdp": pp_layout("1F1B", local_batch=2, shard=2),  # 4 processes: PP 2 x FSDP 2, 2 microbatches
    # 4 processes: PP 2 x TP 2 (4 microbatches) and PP 2 x HSDP 2x1 (2 microbatches)
    "pp_tp": [*pp_layout("1F1B"), "--parallelism.tensor_parallel_degree", "2"],
    "pp_hsdp": [*pp_layout("Interleaved1F1B", local_batch=2), "--parallelism.data_parallel_replicate_degree", "2"],
}


def gathered(trainer: Trainer, optimizer: bool = True) -> dict[str, dict]:
    """The whole model (and flattened optimizer state), on every rank.

    ``full_state_dict`` unshards FSDP and TP within a stage; the stages of other PP ranks come from
    them. (``cpu_offload`` would leave every rank but global rank 0 empty, losing the other stages.)
    """
    opts = StateDictOptions(full_state_dict=True, flatten_optimizer_state_dict=True)
    parts = {"model": get_model_state_dict(trainer.model, options=opts)}
    if optimizer:  # only after a load or a step: a fresh optimizer's state dict initialises it
        parts["optimizer"] = get_optimizer_state_dict(trainer.model, trainer.optimizer, options=opts)
    mine = {part: {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v for k, v in d.items()}
            for part, d in parts.items()}
    if trainer.pipeline is None:
        return mine  # every rank already holds everything
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    merged: dict[str, dict] = {part: {} for part in mine}
    for theirs in everyone:
        for part, d in theirs.items():
            for key, value in d.items():
                if isinstance(value, torch.Tensor) and key in merged[part]:  # held by several ranks of a stage
                    assert torch.equal(merged[part][key], value), f"ranks disagree on {part} {key}"
                merged[part][key] = value
    return merged


def positions(trainer: Trainer) -> dict:
    """The loaded step and every rank's data loader position."""
    mine = trainer.dataloader.sample_index
    everyone = [None] * dist.get_world_size() if dist.is_initialized() else [mine]
    if dist.is_initialized():
        dist.all_gather_object(everyone, mine)
    return {"step": trainer.train_state.step, "sample_index": everyone}


def straight(base: Path, layout: str) -> None:
    """Train ``layout`` 10 steps (saves at 5 and 10); record the init and the final state."""
    out = base / layout
    trainer = Trainer(make_config(out, *LAYOUTS[layout], *STEPS))
    out.mkdir(parents=True, exist_ok=True)
    save(gathered(trainer, optimizer=False)["model"], out / "init.pt")
    record_consumption(trainer, out)
    trainer.train()
    save(gathered(trainer), out / "final.pt")


def short(base: Path, layout: str, steps: int) -> None:
    """The first ``steps`` of the 10-step run at ``layout`` (no save falls in them); records the init."""
    out = base / layout
    trainer = Trainer(make_config(out, *LAYOUTS[layout], *STEPS))
    out.mkdir(parents=True, exist_ok=True)
    save(gathered(trainer, optimizer=False)["model"], out / "init.pt")
    trainer.train(stop_after=steps)


def resume(base: Path, source: str, layout: str, until: int = 10) -> None:
    """Resume ``source``'s step 5 at ``layout``: record what was loaded, train to step ``until``
    (its state then in ``final.pt`` when that is step 10)."""
    out = base / f"{source}_to_{layout}"
    copy_step(base / source, out, 5)
    trainer = Trainer(make_config(out, *LAYOUTS[layout], *STEPS))
    assert trainer.load_checkpoint() == 5
    save(gathered(trainer), out / "loaded.pt")
    where = positions(trainer)
    if dist_worker.rank0():
        (out / "loaded.json").write_text(json.dumps(where))
    record_consumption(trainer, out)
    trainer.train(stop_after=until)
    if until == 10:
        save(gathered(trainer), out / "final.pt")


def seeded(base: Path, seed: str, layout: str) -> None:
    """Load the seed checkpoint ``base/<seed>/checkpoint/step-0`` at ``layout``; record the weights."""
    out = base / f"{seed}_to_{layout}"
    copy_step(base / seed, out, 0)
    trainer = Trainer(make_config(out, *LAYOUTS[layout], *STEPS))
    assert trainer.load_checkpoint() == 0
    out.mkdir(parents=True, exist_ok=True)
    save(gathered(trainer, optimizer=False)["model"], out / "loaded.pt")


def resave(base: Path, source: str, layout: str) -> None:
    """Start at ``layout`` from ``source``'s step 5 in full (initial_load_path), and save step 5 again
    right away into this run's own folder."""
    out = base / f"resave_{source}_to_{layout}"
    step5 = base / source / "checkpoint" / "step-5"
    trainer = Trainer(make_config(out, *LAYOUTS[layout], *STEPS, "--checkpoint.initial_load_path", str(step5),
                                  "--checkpoint.no_initial_load_model_only"))
    assert trainer.load_checkpoint() == 5
    trainer.checkpointer.save_now(5)


def run_scenario(base: Path, scenario: str) -> None:
    kind, _, arg = scenario.partition(":")
    if kind == "straight":
        straight(base, arg)
    elif kind == "short":
        layout, steps = arg.split("@")
        short(base, layout, int(steps))
    elif kind == "resume":  # resume:SOURCE>LAYOUT[@UNTIL]
        route, _, until = arg.partition("@")
        source, layout = route.split(">")
        resume(base, source, layout, int(until or 10))
    elif kind == "seed":
        seed, layout = arg.split(">")
        seeded(base, seed, layout)
    elif kind == "resave":
        source, layout = arg.split(">")
        resave(base, source, layout)
    else:
        raise ValueError(f"unknown scenario {scenario}")


def main(base: str, scenarios: str) -> None:
    init_distributed(Comm())
    for scenario in scenarios.split(","):
        run_scenario(Path(base), scenario)
        barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
