"""Pipeline-parallel Hugging Face scenarios for tests/test_pipeline_hf.py, run under torchrun (gloo, CPU).

    python -m torch.distributed.run --nproc_per_node=N tests/pp_hf_worker.py BASE HF_FOLDER SCENARIO[,SCENARIO...]

One launch runs every scenario in a row, each with its own Trainer on the same process group:

- ``export:<schedule>[:<extra>...]``: train 2 steps at PP(2), the final save as a Hugging Face
  folder (``BASE/export_<schedule>[_<extra>...]/checkpoint/step-2``); extras (``EXTRAS``): ``fsdp``
  (times FSDP 2), ``bf16`` (exported in bfloat16);
- ``load:<schedule>[:<extra>...]``: start such a run from ``HF_FOLDER`` (``initial_load_in_hf``).

Each writes, from rank 0, ``weights.pt`` (the whole model gathered from every stage after the
export, or right after the load) and ``held.json`` (the model keys each rank held).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from savepoint.config.job_config import Comm  # noqa: E402
from savepoint.distributed import init_distributed  # noqa: E402
from savepoint.train import Trainer  # noqa: E402
from tests.conftest import make_config  # noqa: E402

# 4 samples a step: 4 microbatches of 1, enough for every schedule at PP(2).
PP = ["--parallelism.pipeline_parallel_degree", "2", "--training.local_batch_size", "4"]
EXTRAS = {"fsdp": ["--parallelism.data_parallel_shard_degree", "2"], "bf16": ["--checkpoint.export_dtype", "bfloat16"]}
HF_FINAL = ["--training.steps", "2", "--checkpoint.last_save_model_only", "--checkpoint.last_save_in_hf"]


def scenario_name(scenario: str) -> str:
    """``export:1F1B:fsdp`` -> ``export_1F1B_fsdp``: the scenario's folder under BASE."""
    return scenario.replace(":", "_")


def pp_args(schedule: str, extras: list[str]) -> list[str]:
    """PP(2) with ``schedule``; ``fsdp``: times FSDP(2); ``bf16``: exported in bfloat16."""
    args = [*PP, "--parallelism.pipeline_parallel_schedule", schedule]
    if "fsdp" not in extras:
        args += ["--parallelism.data_parallel_shard_degree", "1"]
    return args + [arg for extra in extras for arg in EXTRAS[extra]]


def record(trainer: Trainer, out: Path) -> None:
    """Rank 0 saves the whole model, gathered from every stage (and shard), and the keys each rank held."""
    # Not cpu_offload: it leaves every rank but 0 with nothing, and here each rank holds other tensors.
    mine = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True))
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, {k: v.detach().cpu().clone() for k, v in mine.items()})
    if dist.get_rank() == 0:
        whole = {k: v for part in everyone for k, v in part.items()}
        torch.save(whole, out / "weights.pt")
        (out / "held.json").write_text(json.dumps([sorted(part) for part in everyone]))


def export(base: Path, schedule: str, extras: list[str], name: str) -> None:
    out = base / name
    trainer = Trainer(make_config(out, *HF_FINAL, *pp_args(schedule, extras)))
    assert trainer.pipeline is not None
    trainer.train()
    record(trainer, out)
    trainer.checkpointer.close()


def load(base: Path, source: Path, schedule: str, extras: list[str], name: str) -> None:
    out = base / name
    trainer = Trainer(make_config(out, *pp_args(schedule, extras), "--checkpoint.initial_load_path", str(source),
                                  "--checkpoint.initial_load_in_hf"))
    assert trainer.pipeline is not None
    assert trainer.load_checkpoint() == 0
    out.mkdir(parents=True, exist_ok=True)
    record(trainer, out)
    trainer.checkpointer.close()


def main(base: str, source: str, scenarios: str) -> None:
    init_distributed(Comm())
    for scenario in scenarios.split(","):
        kind, schedule, *extras = scenario.split(":")
        if kind == "export":
            export(Path(base), schedule, extras, scenario_name(scenario))
        elif kind == "load":
            load(Path(base), Path(source), schedule, extras, scenario_name(scenario))
        else:
            raise ValueError(f"unknown scenario {scenario}")
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
