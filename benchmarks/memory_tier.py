"""Benchmark: the in-memory checkpoint tier against durable saves: blocking time, restart time, steps lost.

    .venv/bin/python benchmarks/memory_tier.py            # Llama 3 of ~29M parameters + AdamW (~0.35 GB), ~5 min
    .venv/bin/python benchmarks/memory_tier.py --quick    # a small smoke run (~1 min)

Run it from the repository root with the venv's interpreter (``bash scripts/bootstrap.sh`` makes
``.venv`` in a fresh clone; see ``benchmarks/_common.py``).

Disk speed on shared machines swings several-fold between runs, so only figures of one invocation
are compared. The RAM copies go to a fresh folder under ``--memory-parent`` (default ``/dev/shm``,
so that they are real RAM); it and the checkpoint folder (under ``--dir`` if given) are removed at
the end. Three parts:

1. Blocking time of one save of the same state (model + AdamW, as the manager saves it) by a RAM
   save (``memory_interval 1``), a durable sync save and a durable ``async_with_pinned_mem`` save:
   what the training loop is blocked, the ``step_done()`` call plus the ``wait_for_staging()`` wait
   before the next ``optimizer.step()``. Each save runs inside a training loop (forward, backward,
   AdamW on a batch sized so that a step takes about 0.25 s) in this process (one rank of gloo, which
   ``async_with_pinned_mem`` needs for its writer process); the three take turns, the order rotating
   every repeat, and each manager's first save (buffer allocation) is not timed.
2. Restart to the first trained step: a fresh process runs ``savepoint.train.Trainer`` on the same
   model (registered as a flavor), which loads the newest step and trains one step, once resuming
   from RAM, once from disk (the tier off, as after a node loss). Before each the page cache is
   dropped where the kernel allows it (root), then the libraries are read back by an untimed import,
   so that only the checkpoint is cold. The load alone is reported as well.
3. Steps lost per failure: a real ``Trainer`` run with ``interval 10`` and ``memory_interval 1``,
   and one with ``interval 10`` alone. After every step the newest step committed anywhere (the
   durable folder, this rank's RAM folder) is recorded; a failure right after step ``s`` loses
   ``s`` minus it. Also the training throughput of both runs: on a machine with few cores the RAM
   writer competes with training.

Every training process runs ``--threads`` torch intra-op threads (default 1): on a machine of two
cores shared with other work, two threads make every operation wait for the later-scheduled one,
and steps then vary from 0.1 s to several seconds, which would drown the figures; with one thread
steps are steady and the RAM writer (a thread of the trainer) gets the other core when it is free.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common as common
import torch
import torch.distributed as dist
from async_save import Clock, Job, build_job, calibrate_step, free_port, tensor_bytes

from savepoint.checkpoint import CheckpointManager
from savepoint.config.job_config import Checkpoint, Comm
from savepoint.distributed import init_distributed
from savepoint.models.llama3.args import LLAMA3_FLAVORS, ModelArgs

if __name__ == "__mp_main__":  # this file imported by the spawned writer process of async_with_pinned_mem
    import torch.distributed.checkpoint._async_process_executor as _executor

    _executor._init_logger = lambda rank: None  # it logs every request at INFO; warnings and errors still show

ROOT = Path(__file__).resolve().parent.parent
FLAVOR = "memory-tier-bench"  # the benchmark's model, registered as a flavor in the Trainer processes
SEQ_LEN = 64
MAX_STEPS_PER_SAVE = 200
SEED_STEPS, SEED_INTERVAL = 4, 3  # part 2: durable step 3, RAM steps 2 and 4 (3 is durable only)
LOST_INTERVAL = 10  # part 3: the durable interval of both runs
WARMUP_STEPS = 2  # part 3: steps left out of the throughput
MODES = ("RAM (memory_interval 1)", "durable sync", "durable async_with_pinned_mem")
PRESETS = {
    "default": {"dim": 768, "n_layers": 2, "vocab_size": 10240, "repeats": 2, "steps": 20, "runs": 2},
    "quick": {"dim": 256, "n_layers": 2, "vocab_size": 8192, "repeats": 1, "steps": 12, "runs": 1},
}
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


def median(values: list[float]) -> float:
    return statistics.median(values)


def ratio_cells(num: list[float], den: list[float]) -> str:
    """The ratio of the medians, and the range of the per-repeat ratios."""
    pairs = [a / b for a, b in zip(num, den, strict=True)]
    return f"{median(num) / median(den):.3f}x (per repeat {min(pairs):.3f}x - {max(pairs):.3f}x)"


# ---- part 1: blocking time ----------------------------------------------------------------------


@dataclass
class Blocking:
    blocked: list[float] = field(default_factory=list)  # step_done() + wait_for_staging() before optimizer.step
    call: list[float] = field(default_factory=list)  # step_done() alone
    committed: list[float] = field(default_factory=list)  # step_done() to the poll that committed it
    steps_during: list[float] = field(default_factory=list)
    steps_normal: list[float] = field(default_factory=list)


def managers(job: Job, work_dir: Path, shm: Path) -> dict[str, CheckpointManager]:
    ram = Checkpoint(enable=True, folder="ram-durable", interval=10**9, keep_latest_k=0, last_save_model_only=False,
                     memory_interval=1, memory_folder=str(shm), memory_keep_latest_k=2)
    return {MODES[0]: CheckpointManager(ram, str(work_dir), job.model, states=job.states, job_config={}),
            MODES[1]: common.keep_all_manager(work_dir, "sync", job.model, job.states, "disabled"),
            MODES[2]: common.keep_all_manager(work_dir, "pinned", job.model, job.states, "async_with_pinned_mem")}


def in_flight(manager: CheckpointManager) -> bool:
    if manager.memory is not None:
        return manager.memory.saver.inflight is not None
    return manager.saver is not None and manager.saver.inflight is not None


def poll(manager: CheckpointManager) -> None:
    """Commit a finished save, as the trainer's next ``step_done`` does."""
    if manager.memory is not None:
        manager.memory.poll()
    else:
        manager.poll()


def settle(manager: CheckpointManager) -> None:
    """Commit the save in flight and drop the durable step just written (the RAM tier keeps its own 2)."""
    if manager.memory is not None:
        manager.memory.finish()
        return
    manager.finish_inflight()
    for step in manager.folder.committed_steps():
        manager.folder.delete(step)


def timed_save(job: Job, manager: CheckpointManager, step: int, clock: Clock, out: Blocking) -> None:
    """Two plain steps, then one save inside the training loop, trained on until it is committed."""
    for _ in range(2):
        out.steps_normal.append(job.step()[0])
    clock.flush()
    start = time.perf_counter()
    manager.step_done(step, lambda s: False)
    call = time.perf_counter() - start
    waits: list[float] = []
    committed = call
    while (not waits or in_flight(manager)) and len(waits) < MAX_STEPS_PER_SAVE:
        seconds, waited = job.step(manager.wait_for_staging)
        waits.append(waited)
        if in_flight(manager):
            out.steps_during.append(seconds)
        poll(manager)
        committed = time.perf_counter() - start
    settle(manager)
    out.call.append(call)
    out.blocked.append(call + waits[0])
    out.committed.append(committed)


def blocking(job: Job, work_dir: Path, shm: Path, clock: Clock, repeats: int) -> dict[str, Blocking]:
    """Each mode's saves, taking turns (the order rotates every repeat) after one untimed save each."""
    results = {mode: Blocking() for mode in MODES}
    opened = managers(job, work_dir, shm)
    step = 0
    try:
        for manager in opened.values():  # the first save allocates the staging buffers (and the writer process)
            step += 1
            timed_save(job, manager, step, clock, Blocking())
        for i in range(repeats):
            for mode in MODES[i % 3:] + MODES[:i % 3]:
                step += 1
                timed_save(job, opened[mode], step, clock, results[mode])
    finally:
        for manager in opened.values():
            manager.close()
    return results


def print_blocking(results: dict[str, Blocking], nbytes: int, step_s: float, batch: int, repeats: int) -> None:
    print(f"\n1. Blocking time of one save: {nbytes / 1e9:.3f} GB of state, a training step {step_s:.3f} s "
          f"(batch {batch} x {SEQ_LEN}), {repeats} repeats, medians")
    print(f"   {'':<32} {'blocked s':>10} {'range':>17} {'call s':>8} {'committed s':>12} {'step in flight':>15}")
    for mode, r in results.items():
        during = f"{median(r.steps_during):.3f} s" if r.steps_during else "-"
        print(f"   {mode:<32} {median(r.blocked):>10.4f} {min(r.blocked):>8.4f} - {max(r.blocked):.4f} "
              f"{median(r.call):>8.4f} {median(r.committed):>12.3f} {during:>15}")
    plain = [s for r in results.values() for s in r.steps_normal]
    print(f"   (blocked: step_done() + the wait_for_staging() before the next optimizer.step(); committed: from "
          f"step_done() to the commit seen after a step; a step with no save in flight: {median(plain):.3f} s)")
    ram, sync, pinned = (results[m].blocked for m in MODES)
    print(f"   RAM / durable sync: {ratio_cells(ram, sync)}")
    print(f"   RAM / durable async_with_pinned_mem: {ratio_cells(ram, pinned)}")


# ---- Trainer processes (parts 2 and 3) ----------------------------------------------------------


def trainer_argv(spec: dict[str, Any]) -> list[str]:
    return ["--job.config_file", str(ROOT / "configs" / "debug_model.toml"), "--job.dump_folder", spec["dump"],
            "--model.flavor", FLAVOR, "--training.seq_len", str(SEQ_LEN),
            "--training.local_batch_size", str(spec["batch"]), "--training.steps", "1000",
            "--checkpoint.enable", "--checkpoint.interval", str(spec["interval"]),
            "--checkpoint.memory_interval", str(spec["memory_interval"]),
            "--checkpoint.memory_folder", spec["shm"], "--metrics.log_freq", "1000"]


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: a Trainer on the benchmark's model, doing what ``spec["role"]`` says."""
    imported = time.time()
    common.quiet_savepoint_log()
    set_threads(spec["threads"])
    LLAMA3_FLAVORS[FLAVOR] = ModelArgs(**spec["model"])
    from savepoint.job import parse_args
    from savepoint.train import Trainer

    trainer = Trainer(parse_args(trainer_argv(spec), environ={}))
    ckpt = trainer.checkpointer
    out: dict[str, Any] = {"imported": imported - spec["spawned"], "built": time.time() - spec["spawned"]}
    if spec["role"] == "seed":  # train, then stop as a crash does: the RAM copies stay
        trainer.train(stop_after=SEED_STEPS)
        assert ckpt.memory is not None
        ckpt.memory.finish()
        out.update(durable=ckpt.folder.committed_steps(), ram=ckpt.memory.folder.committed_steps())
    elif spec["role"] == "restart":  # load the newest step, train one, and die
        start = time.time()
        loaded = trainer.load_checkpoint()
        out.update(loaded_step=loaded, load=time.time() - start)
        trainer.train(stop_after=(loaded or 0) + 1)
        out["first_step"] = time.time() - spec["spawned"]
    elif spec["role"] == "run":
        out["records"] = observed_run(trainer, spec["steps"])
        ckpt.close()
    return out


def observed_run(trainer: Any, steps: int) -> list[tuple[int, int, int, float]]:
    """Train ``steps`` steps; after each, (step, newest durable step, newest RAM step (0: none), perf_counter)."""
    ckpt = trainer.checkpointer
    records: list[tuple[int, int, int, float]] = []
    step_done = ckpt.step_done

    def observed(step: int, *args: Any, **kwargs: Any) -> bool:
        stop = step_done(step, *args, **kwargs)
        now = time.perf_counter()
        durable = ckpt.folder.committed_steps()
        ram = ckpt.memory.folder.committed_steps() if ckpt.memory is not None else []
        records.append((step, max(durable, default=0), max(ram, default=0), now))
        return stop

    ckpt.step_done = observed
    trainer.train(stop_after=steps)
    return records


def spawn(spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``child(spec)`` in a fresh interpreter (no process-group variables); its result."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    spec = {**spec, "spawned": time.time()}
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"the {spec['role']} process failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def warm_up(base: dict[str, Any], work_dir: Path) -> None:
    """Build a Trainer with no checkpoint to load (untimed): the libraries and the corpus are read back into
    the page cache, so that a restart after a cache drop meets a cold checkpoint only."""
    shutil.rmtree(work_dir / "warm", ignore_errors=True)
    spawn({**base, "role": "warm", "dump": str(work_dir / "warm"), "interval": 1000, "memory_interval": 0})


# ---- part 2: restart ----------------------------------------------------------------------------


def restarts(base: dict[str, Any], work_dir: Path, clock: Clock, repeats: int) -> dict[str, Any]:
    """A seed run that crashes at step 4, then fresh processes that resume from RAM and from disk, alternating."""
    spec = {**base, "dump": str(work_dir / "restart"), "interval": SEED_INTERVAL, "memory_interval": 1}
    seed = spawn({**spec, "role": "seed"})
    runs: dict[str, list[dict[str, Any]]] = {"RAM": [], "disk": []}
    for i in range(repeats):
        for where in ("disk", "RAM") if i % 2 == 0 else ("RAM", "disk"):
            clock.flush()
            warm_up(base, work_dir)
            memory_interval = 1 if where == "RAM" else 0
            runs[where].append(spawn({**spec, "role": "restart", "memory_interval": memory_interval}))
    return {"seed": seed, "runs": runs}


def print_restarts(res: dict[str, Any], cold: bool) -> None:
    seed, runs = res["seed"], res["runs"]
    cache = ("page cache dropped before each, then libraries and corpus read back by an untimed Trainer build"
             if cold else "page cache NOT dropped (not permitted): the disk load may be served from memory")
    print(f"\n2. Restart to the first trained step: a fresh process (Trainer: imports, model, load, one step); "
          f"durable steps {seed['durable']}, RAM steps {seed['ram']}; {cache}; {len(runs['RAM'])} repeats, medians")
    print(f"   {'':<12} {'first step s':>13} {'range':>15} {'imports s':>10} {'start-up s':>11} {'load s':>8} "
          f"{'range':>15} {'load+step s':>12} {'loaded':>7}")
    columns: dict[str, dict[str, list[float]]] = {}
    for where, rows in runs.items():
        col = columns[where] = {"first": [r["first_step"] for r in rows], "load": [r["load"] for r in rows],
                                "after": [r["first_step"] - r["built"] for r in rows]}
        first, load = col["first"], col["load"]
        imported, built = median([r["imported"] for r in rows]), median([r["built"] for r in rows])
        print(f"   from {where:<7} {median(first):>13.3f} {min(first):>6.3f} - {max(first):.3f} {imported:>10.3f} "
              f"{built:>11.3f} {median(load):>8.3f} {min(load):>6.3f} - {max(load):.3f} {median(col['after']):>12.3f} "
              f"{str(sorted({r['loaded_step'] for r in rows})):>7}")
    print("   (imports: process start to the benchmark's code running; start-up: process start to a built Trainer, "
          "before the load, the same work for both; load+step: from then to the end of the first step)")
    ram, disk = columns["RAM"], columns["disk"]
    for key, what in (("first", "first step"), ("after", "load+step"), ("load", "load alone")):
        print(f"   {what}, RAM / disk: {ratio_cells(ram[key], disk[key])}")


# ---- part 3: steps lost -------------------------------------------------------------------------


def lost_runs(base: dict[str, Any], work_dir: Path, steps: int, runs: int) -> dict[str, list[list[list[float]]]]:
    """``runs`` Trainer runs of each configuration, alternating; each run's records (see ``observed_run``)."""
    configs = {f"interval {LOST_INTERVAL} + memory_interval 1": 1, f"interval {LOST_INTERVAL} only": 0}
    out: dict[str, list[list[list[float]]]] = {name: [] for name in configs}
    for i in range(runs):
        for name, memory_interval in configs.items() if i % 2 == 0 else reversed(configs.items()):
            spec = {**base, "role": "run", "dump": str(work_dir / f"lost-{memory_interval}-{i}"),
                    "interval": LOST_INTERVAL, "memory_interval": memory_interval, "steps": steps}
            out[name].append(spawn(spec)["records"])
    return out


def run_figures(records: list[list[float]]) -> tuple[list[int], float, float, int]:
    """(steps lost after each step, steps/s and median step seconds past the warm-up, RAM steps committed)."""
    lost = [int(step - max(durable, ram)) for step, durable, ram, _ in records]
    times = [t for *_, t in records][WARMUP_STEPS:]
    rate = (len(times) - 1) / (times[-1] - times[0])
    step_s = median([b - a for a, b in zip(times, times[1:], strict=False)])
    return lost, rate, step_s, len({ram for _, _, ram, _ in records if ram})


def print_lost(runs: dict[str, list[list[list[float]]]]) -> None:
    steps = len(next(iter(runs.values()))[0])
    print(f"\n3. Steps lost per failure: {len(next(iter(runs.values())))} Trainer run(s) of {steps} steps each "
          f"(a failure right after step s loses s - the newest step committed in the durable or the RAM folder); "
          f"throughput past the first {WARMUP_STEPS} steps, median of the runs")
    print(f"   {'':<32} {'mean lost':>10} {'max lost':>9} {'steps/s':>8} {'median step s':>14} "
          f"{'RAM steps committed':>20}")
    rates = []
    for name, records in runs.items():
        figures = [run_figures(r) for r in records]
        lost = [n for f in figures for n in f[0]]
        rates.append([f[1] for f in figures])
        ram = "/".join(str(f[3]) for f in figures)
        print(f"   {name:<32} {statistics.mean(lost):>10.2f} {max(lost):>9d} {median(rates[-1]):>8.2f} "
              f"{median([f[2] for f in figures]):>14.3f} {ram:>20}")
    print(f"   steps/s with the RAM tier / without: {ratio_cells(rates[0], rates[1])}; on {os.cpu_count()} cores "
          "the RAM writer (a thread of the trainer) competes with training")


# ---- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.model_parser(__doc__, PRESETS, "small model, few repeats: a smoke run of ~1 min",
                                 "timed saves per mode and restarts per source (default 2, --quick 1)")
    parser.add_argument("--steps", type=int, help="steps of each run of part 3 (default 20, --quick 12)")
    parser.add_argument("--runs", type=int, help="runs of each configuration in part 3, alternating (default 2, "
                                                 "--quick 1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads of every training process (default 1; 0: torch's default)")
    parser.add_argument("--memory-parent", default="/dev/shm",
                        help="where the RAM folder is made (default /dev/shm: a RAM-backed tmpfs)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        return args
    common.apply_preset(parser, args, PRESETS)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.steps < WARMUP_STEPS + 2:
        parser.error(f"--steps must be at least {WARMUP_STEPS + 2}")
    return args


def set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def in_process_group(run: Callable[[], Any]) -> Any:
    """``run()`` as one rank of gloo (``async_with_pinned_mem`` writes from a process, which needs a group)."""
    saved = {k: os.environ.get(k) for k in DIST_ENV}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    init_distributed(Comm(backend="gloo"))
    try:
        return run()
    finally:
        dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main() -> None:
    args = parse_args()
    if args.child is not None:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        os._exit(0)  # a crash leaves no clean-up behind: the RAM copies stay, as after a SIGKILL
    if "RANK" in os.environ:
        raise SystemExit("run this benchmark as one process, not under torchrun")
    start = time.perf_counter()
    set_threads(args.threads)
    common.quiet_savepoint_log()
    warnings.filterwarnings("ignore", message=".*pin.?memory.*")  # pinned memory needs CUDA; CPU uses shm
    shm = Path(tempfile.mkdtemp(prefix="savepoint-memory-tier-", dir=args.memory_parent))
    clock = Clock()
    try:
        with common.work_folder("savepoint-memory-tier-", args.dir) as work_dir:
            print(f"RAM folder {shm}", flush=True)
            run(args, work_dir, shm, clock)
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    print(f"\n{common.machine_note(clock.cold)}, {torch.get_num_threads()} intra-op thread(s) per training process; "
          f"{time.perf_counter() - start:.0f} s in all")


def part_one(args: argparse.Namespace, work_dir: Path, shm: Path, clock: Clock) -> tuple[Any, ...]:
    """Build the model, calibrate the batch, time the three saves; (results, state bytes, step s, batch)."""
    model_args = common.llama_args(args, SEQ_LEN)
    job = build_job(model_args)
    params = sum(p.numel() for p in job.model.parameters())
    nbytes = tensor_bytes(job.state())
    step_s = calibrate_step(job, model_args)
    batch = job.tokens.shape[0]
    print(f"  {params / 1e6:.1f}M parameters, {nbytes / 1e9:.3f} GB of state; step {step_s:.3f} s at batch {batch}; "
          "1. blocking ...", flush=True)
    return in_process_group(lambda: blocking(job, work_dir, shm, clock, args.repeats)), nbytes, step_s, batch


def run(args: argparse.Namespace, work_dir: Path, shm: Path, clock: Clock) -> None:
    blocked, nbytes, step_s, batch = part_one(args, work_dir, shm, clock)
    model = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
             "vocab_size": args.vocab_size, "max_seq_len": SEQ_LEN}
    base = {"model": model, "batch": batch, "shm": str(shm), "threads": args.threads}
    print("  2. restarts ...", flush=True)
    restarted = restarts(base, work_dir, clock, args.repeats)
    print(f"  3. {2 * args.runs} runs of {args.steps} steps ...", flush=True)
    lost = lost_runs(base, work_dir, args.steps, args.runs)
    print_blocking(blocked, nbytes, step_s, batch, args.repeats)
    print_restarts(restarted, clock.cold)
    print_lost(lost)


if __name__ == "__main__":
    main()
