"""Benchmark: a resharded load against a same-layout load, and saves at 1 and 2 processes.

    .venv/bin/python benchmarks/reshard.py            # Llama 3 of ~160M parameters + AdamW (~1.9 GB), 5 repeats
    .venv/bin/python benchmarks/reshard.py --quick    # a small smoke run (~20 s)

Run it from the repository root with the venv's interpreter (``bash scripts/bootstrap.sh`` makes
``.venv`` in a fresh clone; see ``benchmarks/_common.py``).

Disk speed on shared machines swings several-fold between runs, so every number compared here is
measured in one invocation. This process only orchestrates; two torchrun launches do the work:

- 2 processes: build the model at FSDP(2), take one AdamW step (so exp_avg and exp_avg_sq exist) and
  save ``--repeats`` times; then build the same model at TP(2) on the same process group and load
  the last FSDP(2) save alternately into the FSDP(2) model (same layout) and the TP(2) model
  (resharded), swapping which goes first on every repeat so that disk drift favours neither;
- 1 process: the same model and step unsharded, saved ``--repeats`` times; then the FSDP(2)
  checkpoint loaded into it.

Only ``CheckpointManager.save`` / ``load`` is timed, from a barrier to a barrier, so model
construction is not. Before each timed call the page cache is synced and dropped when the kernel
allows it (root), so loads read from the disk ("cold"); otherwise the output says the cache was
warm. The workers hand their timings back in JSON files; the checkpoints live in a temporary folder
(under ``--dir`` if given) that is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import _common as common
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint import DefaultSavePlanner

from savepoint.checkpoint import CheckpointManager
from savepoint.checkpoint.reader import VerifyingReader
from savepoint.checkpoint.states import TrainState
from savepoint.checkpoint.storage import folder_bytes
from savepoint.config.job_config import Comm, LRScheduler, Optimizer
from savepoint.distributed import build_mesh, init_distributed
from savepoint.models.llama3.args import ModelArgs
from savepoint.models.llama3.model import build_model
from savepoint.models.llama3.parallelize import column_sharded, parallelize_llama
from savepoint.optim import build_lr_scheduler, build_optimizer
from savepoint.parallel_dims import ParallelDims

SEED = 0
SEQ_LEN = 16  # tokens of the one training step; even, as sequence parallelism (TP 2) splits it
FSDP_FOLDER = "fsdp2"  # the FSDP(2) saves; the last one is the checkpoint every load reads
SINGLE_FOLDER = "ws1"  # the 1-process saves
RESHARD_TARGET = 1.1  # a resharded load takes at most 1.1x a same-layout load
# Model size and repeats: the default run (about 1.9 GB of checkpoint) and --quick.
PRESETS = {
    "default": {"dim": 1024, "n_layers": 8, "vocab_size": 32000, "repeats": 5},
    "quick": {"dim": 256, "n_layers": 2, "vocab_size": 8192, "repeats": 3},
}
FSDP2 = ParallelDims(dp_replicate=1, dp_shard=2, tp=1, world_size=2)
TP2 = ParallelDims(dp_replicate=1, dp_shard=1, tp=2, world_size=2)
ONE = ParallelDims(dp_replicate=1, dp_shard=1, tp=1, world_size=1)


# ---- workers (under torchrun) ----------------------------------------------------------------


def rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class Clock:
    """Times one checkpoint call on every rank: sync and drop the page cache, barrier, call, barrier.

    ``cold`` (meaningful on rank 0, which drops the cache for the whole machine) stays True while
    every drop succeeded; after the first refusal the cache is only synced.
    """

    def __init__(self) -> None:
        self.cold = True

    def _flush(self) -> None:
        if rank0():
            self.cold = common.flush_page_cache(self.cold)
        barrier()

    def time(self, call: Callable[[], object]) -> float:
        """Seconds from the moment every rank is ready until every rank has returned from ``call()``."""
        self._flush()
        start = time.perf_counter()
        call()
        barrier()
        return time.perf_counter() - start


@dataclass
class Job:
    """One model at one layout, one AdamW step into training, and the states a checkpoint holds."""

    dims: ParallelDims
    model: nn.Module
    states: dict[str, Any]

    def manager(self, work_dir: Path, folder: str) -> CheckpointManager:
        """A manager over ``work_dir/folder`` that saves every step and keeps all (the benchmark deletes)."""
        return common.keep_all_manager(work_dir, folder, self.model, self.states, layout=self.dims.as_dict(),
                                column_tiled=column_sharded)


def build_job(model_args: ModelArgs, dims: ParallelDims, device: torch.device) -> Job:
    """Build the model at ``dims`` as ``Trainer.__init__`` does, and take one step on a random batch."""
    mesh = build_mesh(dims, device)
    model = build_model(model_args, seed=SEED, device=device,
                        parallelize=(lambda m: parallelize_llama(m, mesh, dims)) if mesh else None)
    optimizer = build_optimizer(model, Optimizer())
    lr_scheduler = build_lr_scheduler(optimizer, LRScheduler(), total_steps=100)
    # The same batch on every rank and at every layout: the step only has to create AdamW state.
    tokens = torch.randint(model_args.vocab_size, (1, SEQ_LEN + 1), generator=torch.Generator().manual_seed(SEED))
    logits = model(tokens[:, :-1].to(device))  # [1, SEQ_LEN, vocab_size]
    F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten().to(device)).backward()
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    train_state = TrainState()
    train_state.step = 1
    return Job(dims, model, common.checkpoint_states(model, optimizer, lr_scheduler, train_state))


def timed_saves(manager: CheckpointManager, clock: Clock, repeats: int) -> list[float]:
    """Save steps 1..repeats, timing each; the previous step is deleted untimed, so one stays on disk."""
    seconds = []
    for step in range(1, repeats + 1):
        seconds.append(clock.time(partial(manager.save, step)))
        if step > 1 and rank0():
            manager.folder.delete(step - 1)
        barrier()
    return seconds


class ReadCounter:
    """Bytes of saved chunks this rank reads and deserializes during loads.

    DCP's ``FileSystemReader`` reads every saved chunk a request overlaps in full, then narrows it.
    When the load layout cuts tensors differently from the save layout (TP's row-wise ``wo``/``w2``
    want column slices of FSDP's row chunks), a rank reads more than it keeps: this measures how much.
    """

    def __init__(self) -> None:
        self.nbytes = 0
        original = VerifyingReader._slice_file  # every chunk a savepoint load reads goes through it

        def counting_slice(reader, file, sinfo):
            self.nbytes += sinfo.length
            return original(reader, file, sinfo)

        VerifyingReader._slice_file = counting_slice

    def total(self) -> int:
        """Bytes read so far, summed over the ranks."""
        count = torch.tensor([self.nbytes], dtype=torch.int64)
        if dist.is_initialized():
            dist.all_reduce(count)
        return int(count.item())


def load(manager: CheckpointManager, step: int) -> None:
    """``manager.load(step)``, checked: an explicit step that loads returns itself."""
    loaded = manager.load(step=step)
    assert loaded == step, f"loaded step {loaded}, expected {step}"


def load_once(job: Job, work_dir: Path, step: int, clock: Clock | None = None) -> float:
    """Load ``step`` of the FSDP(2) folder into ``job`` through a manager of its own (a folder takes one open
    manager at a time); returns the seconds of the load alone, timed by ``clock`` if given."""
    manager = job.manager(work_dir, FSDP_FOLDER)
    try:
        if clock is None:
            load(manager, step)
            return 0.0
        return clock.time(partial(load, manager, step))
    finally:
        manager.close()


def two_process_worker(model_args: ModelArgs, device: torch.device, work_dir: Path, repeats: int,
                       clock: Clock) -> dict[str, Any]:
    """FSDP(2) saves, then alternating same-layout (FSDP 2) and resharded (TP 2) loads of the last one."""
    fsdp = build_job(model_args, FSDP2, device)
    fsdp_manager = fsdp.manager(work_dir, FSDP_FOLDER)
    saves = timed_saves(fsdp_manager, clock, repeats)
    step = repeats
    nbytes = folder_bytes(fsdp_manager.folder.step_dir(step)) if rank0() else 0
    fsdp_manager.close()
    # A second mesh on the same process group, as tests/dist_worker.py does for its scenarios.
    jobs = {"same": fsdp, "resharded": build_job(model_args, TP2, device)}
    loads: dict[str, list[float]] = {"same": [], "resharded": []}
    read: dict[str, int] = {}
    counter = ReadCounter()
    for name in ("same", "resharded"):  # one untimed load each, to count the bytes it reads
        before = counter.total()
        load_once(jobs[name], work_dir, step)
        read[name] = counter.total() - before
    for i in range(repeats):
        order = ["same", "resharded"] if i % 2 == 0 else ["resharded", "same"]
        for name in order:
            loads[name].append(load_once(jobs[name], work_dir, step, clock))
    return {
        "params": sum(p.numel() for p in fsdp.model.parameters()),  # DTensor.numel() is the global count
        "bytes": nbytes,
        "save": saves,
        "load_same": loads["same"],
        "load_resharded": loads["resharded"],
        "read_same": read["same"],
        "read_resharded": read["resharded"],
    }


def one_process_worker(model_args: ModelArgs, device: torch.device, work_dir: Path, repeats: int,
                       clock: Clock) -> dict[str, Any]:
    """1-process saves, then loads of the FSDP(2) checkpoint the 2-process launch left."""
    one = build_job(model_args, ONE, device)
    manager = one.manager(work_dir, SINGLE_FOLDER)
    saves = timed_saves(manager, clock, repeats)
    nbytes = folder_bytes(manager.folder.step_dir(repeats))
    manager.folder.delete(repeats)  # only the FSDP(2) checkpoint stays, as in the 2-process loads
    loader = one.manager(work_dir, FSDP_FOLDER)
    loads = [clock.time(partial(load, loader, repeats)) for _ in range(repeats)]
    untiled, tiled = untiled_vs_tiled_saves(one.manager(work_dir, "tiling"), clock, repeats)
    return {"bytes": nbytes, "save": saves, "load": loads, "save_untiled": untiled, "save_tiled": tiled}


def untiled_vs_tiled_saves(manager: CheckpointManager, clock: Clock, repeats: int) -> tuple[list[float], list[float]]:
    """What column tiles cost a save: alternating saves with DCP's default planner and with the tiled one."""
    import savepoint.checkpoint.writing as manager_module

    tiled_planner = manager_module.TiledSavePlanner
    seconds: dict[bool, list[float]] = {False: [], True: []}
    for i in range(repeats):
        for tiled in ((False, True) if i % 2 == 0 else (True, False)):
            manager_module.TiledSavePlanner = tiled_planner if tiled else (lambda **_: DefaultSavePlanner())
            try:
                seconds[tiled].append(clock.time(partial(manager.save, 1)))
            finally:
                manager_module.TiledSavePlanner = tiled_planner
            manager.folder.delete(1)
    return seconds[False], seconds[True]


def run_worker(args: argparse.Namespace) -> None:
    """One rank of a torchrun launch; rank 0 writes the timings to ``--out``."""
    common.quiet_savepoint_log()
    device = init_distributed(Comm())
    worker = two_process_worker if args.worker == "two" else one_process_worker
    clock = Clock()
    try:
        result = worker(common.llama_args(args, SEQ_LEN), device, Path(args.work_dir), args.repeats, clock)
        if rank0():
            Path(args.out).write_text(json.dumps({**result, "cold": clock.cold}))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---- orchestration and report ----------------------------------------------------------------


def launch(nproc: int, role: str, args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    """Run ``role`` under torchrun with ``nproc`` processes; returns rank 0's timings."""
    out = work_dir / f"{role}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--rdzv_backend", "c10d",
           "--rdzv_endpoint", "localhost:0", str(Path(__file__).resolve()), "--worker", role,
           "--work-dir", str(work_dir), "--out", str(out), "--repeats", str(args.repeats),
           "--dim", str(args.dim), "--n-layers", str(args.n_layers), "--n-heads", str(args.n_heads),
           "--n-kv-heads", str(args.n_kv_heads), "--vocab-size", str(args.vocab_size)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print(f"  running {nproc} process(es): {role} ...", flush=True)
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-4000:] + result.stderr[-8000:])
        raise SystemExit(f"the {nproc}-process launch ({role}) failed with exit code {result.returncode}")
    return json.loads(out.read_text())


def row(operation: str, layout: str, seconds: list[float], nbytes: int, note: str = "") -> str:
    """One table line: median and range of ``seconds``, and the median's throughput over ``nbytes``."""
    return f"{operation:<6} {layout:<20} {common.timing_cells(seconds, nbytes, 3)}  {note}".rstrip()


def report(args: argparse.Namespace, two: dict[str, Any], one: dict[str, Any], wall: float) -> None:
    """Header, table, the two ratios and a one-line summary, from both launches' timings."""
    cold = two["cold"] and one["cold"]
    cache = common.cache_note(cold, "every timed call", "loads")
    size_mb = two["bytes"] / 1e6
    print()
    print(f"savepoint reshard benchmark: torch {torch.__version__}, {os.cpu_count()} CPU cores, gloo")
    print(f"model: Llama 3 dim {args.dim}, {args.n_layers} layers, {args.n_heads}/{args.n_kv_heads} heads, "
          f"vocab {args.vocab_size}: {two['params'] / 1e6:.1f}M parameters, fp32 + AdamW state")
    print(f"checkpoint: {size_mb:.1f} MB saved at FSDP 2 ({one['bytes'] / 1e6:.1f} MB at 1 process)")
    print(f"{args.repeats} repeats per row, {cache}")
    print("same-layout and resharded loads alternate (order swapped each repeat) in one 2-process launch;")
    print("1-process rows come from a second launch right after it")
    print()
    print(f"{'op':<6} {'layout':<20} {'median s':>9} {'min - max s':>17} {'GB/s':>7}")
    print(row("save", "1 process", one["save"], one["bytes"]))
    print(row("save", "FSDP 2", two["save"], two["bytes"]))
    print(row("load", "FSDP 2 -> FSDP 2", two["load_same"], two["bytes"], "same layout"))
    print(row("load", "FSDP 2 -> TP 2", two["load_resharded"], two["bytes"], "resharded"))
    print(row("load", "FSDP 2 -> 1 process", one["load"], two["bytes"], "extra, separate launch"))
    print()
    line, reshard = common.ratio_line("resharded load (TP 2) / same-layout load (FSDP 2)", two["load_resharded"],
                               two["load_same"], RESHARD_TARGET, "per alternating pair")
    print(line)
    read_ratio = two["read_resharded"] / two["read_same"]
    print(f"bytes read and deserialized per load, all ranks: same layout {two['read_same'] / 1e9:.3f} GB, "
          f"resharded {two['read_resharded'] / 1e9:.3f} GB ({read_ratio:.2f}x); time ratio / bytes ratio "
          f"{reshard / read_ratio:.2f}")
    tile_cost = statistics.median(one["save_tiled"]) / statistics.median(one["save_untiled"])
    print(f"1-process save with column tiles / with DCP's default planner: {tile_cost:.2f}x "
          f"(medians {statistics.median(one['save_tiled']):.3f} s / {statistics.median(one['save_untiled']):.3f} s, "
          f"alternating)")
    save_ratio = statistics.median(two["save"]) / statistics.median(one["save"])
    print(f"save ws=2 (FSDP 2) / save ws=1: {save_ratio:.2f}x")
    print(f"total wall time: {wall:.1f} s")
    print()
    print(f"summary: loading a {size_mb / 1e3:.2f} GB FSDP 2 checkpoint (Llama 3, {two['params'] / 1e6:.0f}M params "
          f"+ AdamW) resharded to TP 2 took {reshard:.2f}x the same-layout load (reading {read_ratio:.2f}x the "
          f"bytes), and saving at 2 processes "
          f"{save_ratio:.2f}x the 1-process time (medians of {args.repeats}, {common.machine_note(cold)})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options, with unset sizes and repeats filled from the default or --quick preset, checked for TP 2."""
    parser = common.model_parser(__doc__, PRESETS, "small model, 3 repeats: a smoke run of ~20 s",
                                 "timed calls per row (default 5, --quick 3)")
    # Internal: set by the orchestrating process for the torchrun workers.
    parser.add_argument("--worker", choices=["two", "one"], help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    common.apply_preset(parser, args, PRESETS)
    if args.n_heads % 2 or args.n_kv_heads % 2 or args.n_heads % args.n_kv_heads:
        parser.error("TP 2 needs even --n-heads and --n-kv-heads, and --n-kv-heads must divide --n-heads")
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        run_worker(args)
        return
    start = time.perf_counter()
    with common.work_folder("savepoint-reshard-", args.dir) as work_dir:
        two = launch(2, "two", args, work_dir)
        one = launch(1, "one", args, work_dir)
    report(args, two, one, time.perf_counter() - start)


if __name__ == "__main__":
    main()
