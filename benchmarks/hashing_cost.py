"""What hashing costs a save: DCP through savepoint's HashingWriter against DCP's plain FileSystemWriter.

    .venv/bin/python benchmarks/hashing_cost.py      # about 1 minute

Both write the async benchmark's default state (89 M parameters + AdamW, 1.07 GB) with torch.save's
zip CRC-32 off (savepoint turns it off: xxh3 covers every byte), so the difference is the xxh3
hashing alone. Six alternating rounds each, first without fsync (the CPU cost, page cache warm),
then durable (with fsync, as savepoint saves). Prints the medians and the per-round ratios.
"""
from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import async_save  # noqa: E402  (the async benchmark's model and state)
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint import FileSystemWriter  # noqa: E402
from torch.utils.serialization import config  # noqa: E402

from savepoint.checkpoint.hashing import HashingWriter  # noqa: E402
from savepoint.models.llama3 import ModelArgs  # noqa: E402

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
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    preset = async_save.PRESETS["default"]
    job = async_save.build_job(ModelArgs(dim=preset["dim"], n_layers=preset["n_layers"], n_heads=16, n_kv_heads=8,
                                         vocab_size=preset["vocab_size"]))
    state = job.state()
    work = Path(tempfile.mkdtemp(prefix="savepoint-hashcost-"))
    try:
        for durable in (False, True):
            times: dict[bool, list[float]] = {False: [], True: []}
            for i in range(ROUNDS):
                for hashing in ((False, True) if i % 2 == 0 else (True, False)):
                    times[hashing].append(timed_save(state, work / f"h{int(hashing)}", hashing, durable))
            plain, hashed = statistics.median(times[False]), statistics.median(times[True])
            rounds = ", ".join(f"{100 * (h / p - 1):+.1f}" for h, p in zip(times[True], times[False], strict=True))
            print(f"{'durable (fsync)' if durable else 'no fsync, warm  '}: plain FileSystemWriter {plain:.3f} s, "
                  f"HashingWriter {hashed:.3f} s: hashing cost {100 * (hashed / plain - 1):+.1f} % "
                  f"(target <= 5 %; per round {rounds} %)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
