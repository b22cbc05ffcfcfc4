"""What hashing costs a save: DCP through savepoint's HashingWriter against DCP's plain FileSystemWriter.

    .venv/bin/python benchmarks/hashing_cost.py            # about 1 minute
    .venv/bin/python benchmarks/hashing_cost.py --quick    # the async benchmark's --quick state, 2 rounds

Run it from the repository root with the venv's interpreter (``bash scripts/bootstrap.sh`` makes
``.venv`` in a fresh clone; see ``benchmarks/_common.py``).

Both write the async benchmark's default state (89 M parameters + AdamW, 1.07 GB) with torch.save's
zip CRC-32 off (savepoint turns it off: xxh3 covers every byte), so the difference is the xxh3
hashing alone. Six alternating rounds each (``--rounds``), first without fsync (the CPU cost, page cache warm),
then durable (with fsync, as savepoint saves). Prints the medians and the per-round ratios.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
import warnings
from pathlib import Path

import async_save  # the async benchmark's model and state (this script's folder is first on sys.path)
import torch.distributed.checkpoint as dcp
from _common import work_folder
from async_report import HASHING_TARGET
from torch.distributed.checkpoint import FileSystemWriter
from torch.utils.serialization import config

from savepoint.checkpoint.hashing import HashingWriter
from savepoint.models.llama3 import ModelArgs

ROUNDS = 6


def timed_save(state: dict, path: Path, hashing: bool, durable: bool) -> float:
    """Seconds for one dcp.save of ``state`` into ``path`` (removed afterwards), zip CRC-32 off."""
    before = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        writer = (HashingWriter if hashing else FileSystemWriter)(path, sync_files=durable)
        start = time.perf_counter()
        dcp.save(state, storage_writer=writer, no_dist=True)
        return time.perf_counter() - start
    finally:
        config.save.compute_crc32 = before
        shutil.rmtree(path, ignore_errors=True)
        os.sync()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the async benchmark's small --quick state")
    parser.add_argument("--rounds", type=int, default=None, help=f"alternating rounds (default {ROUNDS}, --quick 2)")
    parser.add_argument("--dir", help="parent folder of the temporary checkpoint folder (default: the system's)")
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else ROUNDS)
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    preset = async_save.PRESETS["quick" if args.quick else "default"]
    job = async_save.build_job(ModelArgs(dim=preset["dim"], n_layers=preset["n_layers"], n_heads=16, n_kv_heads=8,
                                         vocab_size=preset["vocab_size"]))
    state = job.state()
    with work_folder("savepoint-hashcost-", args.dir) as work:
        for durable in (False, True):
            times: dict[bool, list[float]] = {False: [], True: []}
            for i in range(rounds):
                for hashing in ((False, True) if i % 2 == 0 else (True, False)):
                    times[hashing].append(timed_save(state, work / f"h{int(hashing)}", hashing, durable))
            plain, hashed = statistics.median(times[False]), statistics.median(times[True])
            ratios = ", ".join(f"{100 * (h / p - 1):+.1f}" for h, p in zip(times[True], times[False], strict=True))
            print(f"{'durable (fsync)' if durable else 'no fsync, warm  '}: plain FileSystemWriter {plain:.3f} s, "
                  f"HashingWriter {hashed:.3f} s: hashing cost {100 * (hashed / plain - 1):+.1f} % "
                  f"(target <= {HASHING_TARGET * 100:.0f} %; per round {ratios} %)")

if __name__ == "__main__":
    main()
