"""Benchmark: saves and loads of one state to a local S3 server against the local disk, side by side.

    .venv/bin/python benchmarks/s3.py            # Llama 3 of 75M parameters + AdamW (0.9 GB), ~4-5 min on 2 cores
    .venv/bin/python benchmarks/s3.py --quick    # a small smoke run (< 1 min)

Run it from the repository root with the venv's interpreter (``bash scripts/bootstrap.sh`` makes
``.venv``; the S3 server is moto's, which the test extra installs: ``pip install -e '.[test]'``).

Both folders get the same state (model + AdamW + scheduler + train state, as ``Trainer`` hands it to
the manager) through the real ``CheckpointManager``: a sync save (written, checksummed, committed:
on S3 every object uploaded, then the manifest), and a full load into the live model (every byte
checked against the manifest; on S3, ranged GETs). Then the two async modes, ``async`` and
``async_with_pinned_mem``, each with its own manager per folder: the save call until the state is
staged (what training waits for), and until the step is committed (``finish_inflight``), after
one untimed save per manager that starts its writer (at most 2 timed saves per folder and mode).
The disk and S3 turns alternate, so that both see the same machine load; each row gives the median,
the range and GB/s, and the S3/disk ratio.
The same number of bytes through s3fs alone (a streamed PUT, 64 MiB ranged GETs) gives the
store's ceiling, and savepoint's save and load as a fraction of it. A model-only load
(``exclude_from_loading`` the optimizer) reports how many bytes the ranged GETs fetched against the
step's size.

The S3 server is moto's, started here on 127.0.0.1 as a subprocess: it speaks the S3 protocol
(multipart uploads, ranged GETs), but keeps objects in its own Python process's memory, so its
figures are set by HTTP and moto's per-request cost, not by a disk or a network. Disk figures are
warm-cache unless the page cache can be dropped (root).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import _common as common
import async_save
import torch.distributed as dist

from savepoint.checkpoint.states import OPTIMIZER
from savepoint.config.job_config import Comm
from savepoint.distributed import init_distributed
from savepoint.errors import CheckpointError

if __name__ == "__mp_main__":  # this file imported by the spawned writer process of async_with_pinned_mem
    import torch.distributed.checkpoint._async_process_executor as _executor

    _executor._init_logger = lambda rank: None  # it logs every request at INFO; warnings and errors still show

PRESETS = {
    "default": {"dim": 768, "n_layers": 4, "vocab_size": 32000, "repeats": 3},
    "quick": {"dim": 256, "n_layers": 2, "vocab_size": 8192, "repeats": 2},
}
ASYNC_MODES = ("async", "async_with_pinned_mem")


def start_server() -> tuple[object, str]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.s3server import S3Server

    server = S3Server().start()
    os.environ.update(server.env())
    return server, server.make_bucket("bench")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def fetched_bytes(fn) -> tuple[float, int]:
    """Seconds of ``fn`` and the bytes its S3 reads fetched (s3fs's range fetches, counted on the way)."""
    import s3fs

    total = [0]
    real = s3fs.core.S3File._fetch_range

    def counting(self, start, end):
        data = real(self, start, end)
        total[0] += len(data)
        return data

    s3fs.core.S3File._fetch_range = counting
    try:
        return timed(fn), total[0]
    finally:
        s3fs.core.S3File._fetch_range = real


def main() -> None:
    parser = common.model_parser(__doc__, PRESETS, "small model, 2 repeats: a smoke run of < 1 min",
                                 "timed saves and loads per folder (default 3, --quick 2)")
    args = parser.parse_args()
    common.apply_preset(parser, args, PRESETS)
    common.quiet_savepoint_log()
    warnings.filterwarnings("ignore", message=".*pin.?memory.*")
    if "RANK" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(async_save.free_port()), RANK="0",
                          WORLD_SIZE="1", LOCAL_RANK="0")
    init_distributed(Comm(backend="gloo"))
    server, bucket = start_server()
    try:
        with common.work_folder("savepoint-s3-", args.dir) as work_dir:
            run(args, work_dir, f"s3://{bucket}/run")
    finally:
        server.stop()
        dist.destroy_process_group()


def run(args: argparse.Namespace, work_dir: Path, url: str) -> None:
    job = async_save.build_job(common.llama_args(args, async_save.SEQ_LEN))
    params = sum(p.numel() for p in job.model.parameters())
    managers = {"disk": common.keep_all_manager(work_dir, "checkpoint", job.model, job.states),
                "s3": common.keep_all_manager(work_dir, url, job.model, job.states)}
    times: dict[str, list[float]] = {f"{kind} {where}": [] for kind in ("save", "load") for where in managers}
    sizes: dict[str, int] = {}
    step = 0
    print(f"  sync saves and loads, {args.repeats} per folder ...", flush=True)
    for repeat in range(args.repeats):
        for where in (("disk", "s3") if repeat % 2 == 0 else ("s3", "disk")):
            manager = managers[where]
            step += 1
            job.train_state.step = step
            times[f"save {where}"].append(timed(lambda m=manager, s=step: m.save(s)))
            sizes[where] = manager.folder.step_bytes(step)
            times[f"load {where}"].append(timed(lambda m=manager, s=step: m.load(s)))
            manager.folder.delete(step)
    print(f"  {params / 1e6:.1f}M parameters, {sizes['disk'] / 1e9:.3f} GB per step (S3: "
          f"{sizes['s3'] / 1e9:.3f} GB), {args.repeats} repeats, {os.cpu_count()} CPU cores")
    print(f"  {'':<12} {'median s':>9} {'range s':>17} {'GB/s':>7}")
    for name, seconds in times.items():
        print(f"  {name:<12} {common.timing_cells(seconds, sizes[name.split()[1]], 3)}")
    for kind in ("save", "load"):
        s3, disk = times[f"{kind} s3"], times[f"{kind} disk"]
        pairs = [a / b for a, b in zip(s3, disk, strict=True)]
        print(f"  {kind}: S3 / disk {sum(s3) / sum(disk):.2f}x (per pair {min(pairs):.2f}x - {max(pairs):.2f}x)")

    # The store's own ceiling: the same number of bytes through s3fs alone (8 MiB writes, 64 MiB GETs).
    from savepoint.checkpoint.objstore import ObjectPath, client

    blob, data = (ObjectPath(url) / "raw").path, os.urandom(sizes["s3"])
    raw_put = timed(lambda: _put(client(), blob, data))
    raw_get = timed(lambda: [client().cat_file(blob, start=i, end=min(i + (64 << 20), len(data)))
                             for i in range(0, len(data), 64 << 20)])
    client().rm_file(blob)
    save_share = raw_put / statistics.median(times["save s3"])
    load_share = raw_get / statistics.median(times["load s3"])
    print(f"  s3fs alone, same bytes: PUT {len(data) / 1e9 / raw_put:.3f} GB/s, ranged GETs "
          f"{len(data) / 1e9 / raw_get:.3f} GB/s; savepoint's save {save_share:.2f}x, load {load_share:.2f}x of that")

    # Ranged reads: a model-only load of the S3 step fetches the model's bytes, not the optimizer's.
    s3 = managers["s3"]
    step += 1
    job.train_state.step = step
    s3.save(step)
    s3.cfg.exclude_from_loading = [OPTIMIZER]
    seconds, fetched = fetched_bytes(lambda: s3.load(step))
    total = s3.folder.step_bytes(step)
    print(f"  model-only load from S3 (exclude_from_loading optimizer): fetched {fetched / 1e9:.3f} GB of the "
          f"step's {total / 1e9:.3f} GB ({fetched / total:.2f}x) in {seconds:.3f} s")
    for manager in managers.values():
        manager.close()
    async_rows(args, job, work_dir, url, sizes, step)
    print("  (moto keeps objects in its own process's memory: S3 figures are set by HTTP and its per-request cost)")


def async_rows(args: argparse.Namespace, job, work_dir: Path, url: str, sizes: dict[str, int], step: int) -> None:
    """Per async mode: the save call until staged, and until committed, to disk and S3 in turn."""
    for mode in ASYNC_MODES:
        repeats = min(args.repeats, 2)
        print(f"  {mode}: {repeats} saves per folder ...", flush=True)
        managers = {"disk": common.keep_all_manager(work_dir, f"checkpoint-{mode}", job.model, job.states, mode),
                    "s3": common.keep_all_manager(work_dir, f"{url}-{mode}", job.model, job.states, mode)}
        staged: dict[str, list[float]] = {where: [] for where in managers}
        committed: dict[str, list[float]] = {where: [] for where in managers}
        where = "disk"
        try:
            for where in managers:  # untimed: the writer (thread or process) starts
                manager = managers[where]
                step += 1
                job.train_state.step = step
                manager.save(step)
                manager.finish_inflight()
                manager.folder.delete(step)
            for repeat in range(repeats):
                for where in (("disk", "s3") if repeat % 2 == 0 else ("s3", "disk")):
                    manager = managers[where]
                    step += 1
                    job.train_state.step = step
                    start = time.perf_counter()
                    manager.save(step)
                    manager.wait_for_staging()
                    staged[where].append(time.perf_counter() - start)
                    manager.finish_inflight()
                    committed[where].append(time.perf_counter() - start)
                    manager.folder.delete(step)
        except CheckpointError as e:
            print(f"  {mode}: FAILED at step {step} ({where}): {e}", flush=True)
            continue
        finally:
            for manager in managers.values():
                manager.close()
        print(f"  {'':<12} {'median s':>9} {'range s':>17} {'GB/s':>7}   (until committed; staged: median s)")
        for where in managers:
            print(f"  save {where:<7} {common.timing_cells(committed[where], sizes[where], 3)}   "
                  f"staged {statistics.median(staged[where]):.3f}")
        s3, disk = committed["s3"], committed["disk"]
        pairs = [a / b for a, b in zip(s3, disk, strict=True)]
        print(f"  {mode} save until committed: S3 / disk {sum(s3) / sum(disk):.2f}x "
              f"(per pair {min(pairs):.2f}x - {max(pairs):.2f}x)")


def _put(fs, path: str, data: bytes) -> None:
    with fs.open(path, "wb") as f:
        for i in range(0, len(data), 8 << 20):
            f.write(data[i:i + (8 << 20)])


if __name__ == "__main__":
    main()
