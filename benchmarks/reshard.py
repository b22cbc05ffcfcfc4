"""Benchmark: a resharded load against a same-layout load, and saves at 1 and 2 processes.

    .venv/bin/python benchmarks/reshard.py            # Llama 3 of ~160M parameters + AdamW (~1.9 GB), 5 repeats
    .venv/bin/python benchmarks/reshard.py --quick    # a small smoke run (~20 s)

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
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.checkpoint import DefaultSavePlanner  # noqa: E402

from savepoint.checkpoint import CheckpointManager  # noqa: E402
from savepoint.checkpoint.states import (  # noqa: E402
    LR_SCHEDULER,
    OPTIMIZER,
    TRAIN_STATE,
    LRSchedulerState,
    OptimizerState,
    TrainState,
)
from savepoint.checkpoint.storage import folder_bytes  # noqa: E402
from savepoint.config.job_config import Checkpoint, Comm, LRScheduler, Optimizer  # noqa: E402
from savepoint.distributed import build_mesh, init_distributed  # noqa: E402
from savepoint.models.llama3.args import ModelArgs  # noqa: E402
from savepoint.models.llama3.model import build_model  # noqa: E402
from savepoint.models.llama3.parallelize import column_sharded, parallelize_llama  # noqa: E402
from savepoint.optim import build_lr_scheduler, build_optimizer  # noqa: E402
from savepoint.parallel_dims import ParallelDims  # noqa: E402

SEED = 0
SEQ_LEN = 16  # tokens of the one training step; even, as sequence parallelism (TP 2) splits it
FSDP_FOLDER = "fsdp2"  # the FSDP(2) saves; the last one is the checkpoint every load reads
SINGLE_FOLDER = "ws1"  # the 1-process saves
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
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
            os.sync()
            if self.cold:
                try:
                    DROP_CACHES.write_text("3\n")
                except OSError:
                    self.cold = False
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
        cfg = Checkpoint(enable=True, folder=folder, interval=1, keep_latest_k=0, last_save_model_only=False)
        return CheckpointManager(cfg, str(work_dir), self.model, states=self.states, job_config={},
                                 layout=self.dims.as_dict(), column_tiled=column_sharded)


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
    states = {OPTIMIZER: OptimizerState(model, optimizer), LR_SCHEDULER: LRSchedulerState(lr_scheduler),
              TRAIN_STATE: train_state}
    return Job(dims, model, states)


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
        from torch.distributed.checkpoint import FileSystemReader

        self.nbytes = 0
        original = FileSystemReader._slice_file

        def counting_slice(reader, file, sinfo):
            self.nbytes += sinfo.length
            return original(reader, file, sinfo)

        FileSystemReader._slice_file = counting_slice

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


def two_process_worker(model_args: ModelArgs, device: torch.device, work_dir: Path, repeats: int,
                       clock: Clock) -> dict[str, Any]:
    """FSDP(2) saves, then alternating same-layout (FSDP 2) and resharded (TP 2) loads of the last one."""
    fsdp = build_job(model_args, FSDP2, device)
    fsdp_manager = fsdp.manager(work_dir, FSDP_FOLDER)
    saves = timed_saves(fsdp_manager, clock, repeats)
    step = repeats
    # A second mesh on the same process group, as tests/dist_worker.py does for its scenarios.
    tp = build_job(model_args, TP2, device)
    managers = {"same": fsdp_manager, "resharded": tp.manager(work_dir, FSDP_FOLDER)}
    loads: dict[str, list[float]] = {"same": [], "resharded": []}
    read: dict[str, int] = {}
    counter = ReadCounter()
    for name in ("same", "resharded"):  # one untimed load each, to count the bytes it reads
        before = counter.total()
        load(managers[name], step)
        read[name] = counter.total() - before
    for i in range(repeats):
        order = ["same", "resharded"] if i % 2 == 0 else ["resharded", "same"]
        for name in order:
            loads[name].append(clock.time(partial(load, managers[name], step)))
    return {
        "params": sum(p.numel() for p in fsdp.model.parameters()),  # DTensor.numel() is the global count
        "bytes": folder_bytes(fsdp_manager.folder.step_dir(step)) if rank0() else 0,
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
    import savepoint.checkpoint.manager as manager_module

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
    logging.getLogger("savepoint").setLevel(logging.WARNING)  # the manager logs every save and load
    device = init_distributed(Comm())
    model_args = ModelArgs(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                           vocab_size=args.vocab_size, max_seq_len=SEQ_LEN)
    worker = two_process_worker if args.worker == "two" else one_process_worker
    clock = Clock()
    try:
        result = worker(model_args, device, Path(args.work_dir), args.repeats, clock)
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
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    print(f"  running {nproc} process(es): {role} ...", flush=True)
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-4000:] + result.stderr[-8000:])
        raise SystemExit(f"the {nproc}-process launch ({role}) failed with exit code {result.returncode}")
    return json.loads(out.read_text())


def row(operation: str, layout: str, seconds: list[float], nbytes: int, note: str = "") -> str:
    """One table line: median and range of ``seconds``, and the median's throughput over ``nbytes``."""
    median = statistics.median(seconds)
    spread = f"{min(seconds):.3f} - {max(seconds):.3f}"
    return f"{operation:<6} {layout:<20} {median:>9.3f} {spread:>17} {nbytes / 1e9 / median:>7.2f}  {note}".rstrip()


def report(args: argparse.Namespace, two: dict[str, Any], one: dict[str, Any], wall: float) -> None:
    """Header, table, the two ratios and a one-line summary, from both launches' timings."""
    cold = two["cold"] and one["cold"]
    cache = "cold (page cache dropped before every timed call)" if cold else \
        "warm cache (dropping the page cache was not permitted; loads may be served from memory)"
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
    reshard = statistics.median(two["load_resharded"]) / statistics.median(two["load_same"])
    pairs = [r / s for r, s in zip(two["load_resharded"], two["load_same"], strict=True)]
    verdict = "met" if reshard <= 1.1 else "NOT met"
    print(f"resharded load (TP 2) / same-layout load (FSDP 2): {reshard:.2f}x (target <= 1.1x: {verdict}); "
          f"per alternating pair {min(pairs):.2f}x - {max(pairs):.2f}x")
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
          f"{save_ratio:.2f}x the 1-process time (medians of {args.repeats}, {'cold' if cold else 'warm'} cache, "
          f"{os.cpu_count()} CPU cores, torch {torch.__version__})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options, with unset sizes and repeats filled from the default or --quick preset, checked for TP 2."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model, 3 repeats: a smoke run of ~20 s")
    parser.add_argument("--repeats", type=int, help="timed calls per row (default 5, --quick 3)")
    parser.add_argument("--dim", type=int, help="model width (default 1024, --quick 256)")
    parser.add_argument("--n-layers", type=int, help="transformer blocks (default 8, --quick 2)")
    parser.add_argument("--vocab-size", type=int, help="vocabulary size (default 32000, --quick 8192)")
    parser.add_argument("--n-heads", type=int, default=16, help="attention heads (default 16)")
    parser.add_argument("--n-kv-heads", type=int, default=8, help="key/value heads (default 8)")
    parser.add_argument("--dir", help="parent folder of the temporary checkpoint folder (default: the system's)")
    # Internal: set by the orchestrating process for the torchrun workers.
    parser.add_argument("--worker", choices=["two", "one"], help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, value in PRESETS["quick" if args.quick else "default"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.dim % args.n_heads or (args.dim // args.n_heads) % 2:
        parser.error("--dim must be a multiple of --n-heads with an even head size (RoPE rotates pairs)")
    if args.n_heads % 2 or args.n_kv_heads % 2 or args.n_heads % args.n_kv_heads:
        parser.error("TP 2 needs even --n-heads and --n-kv-heads, and --n-kv-heads must divide --n-heads")
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        run_worker(args)
        return
    start = time.perf_counter()
    work_dir = Path(tempfile.mkdtemp(prefix="savepoint-reshard-", dir=args.dir))
    print(f"benchmarking in {work_dir}", flush=True)
    try:
        two = launch(2, "two", args, work_dir)
        one = launch(1, "one", args, work_dir)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    report(args, two, one, time.perf_counter() - start)


if __name__ == "__main__":
    main()
