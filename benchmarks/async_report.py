"""The report of ``async_save.py``: the header, the timing table, memory, the targets, and a one-line summary."""

from __future__ import annotations

import argparse
import os
import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import _common as common
import torch
from _common import verdict

from savepoint.checkpoint import staging

if TYPE_CHECKING:
    from async_save import AsyncResult

# Targets: blocked / durable sync save, sync save throughput / disk write, sync / torch.save+fsync,
# step during a save / normal step.
BLOCKED_TARGET = 0.005
THROUGHPUT_TARGET = 0.90
VS_TORCH_TARGET = 1.0
STEP_TARGET = 1.25
MEMORY_TARGET = 1.0  # memory the saves add, trainer + writer process (PSS), per byte of state
HASHING_TARGET = 0.05  # hashing costs at most 5 % of a durable save


@dataclass
class Results:
    """Everything one run of the benchmark measured."""

    args: argparse.Namespace
    params: int
    nbytes: int  # bytes of state in memory
    step_s: float  # a calibrated training step
    batch_size: int
    seq_len: int
    base: dict[str, Any]  # baselines(): {"times": name -> seconds, "sizes": name -> bytes}
    first_copy: float
    copies: list[float]
    modes: dict[str, AsyncResult]
    cold: bool
    wall: float

    @property
    def times(self) -> dict[str, list[float]]:
        return self.base["times"]

    @property
    def sizes(self) -> dict[str, int]:
        return self.base["sizes"]


def median(values: list[float]) -> float:
    return statistics.median(values)


def row(name: str, seconds: list[float], nbytes: int | None = None, note: str = "") -> str:
    """One table line: median and range of ``seconds``, and the median's throughput over ``nbytes``."""
    return f"{name:<50} {common.timing_cells(seconds, nbytes, 4)} {len(seconds):>3}  {note}".rstrip()


def report(res: Results) -> None:
    print_header(res)
    print_baselines(res)
    for mode, r in res.modes.items():
        print_async_rows(mode, r)
    print_memory(res)
    missed = print_targets(res)
    print(f"targets missed: {', '.join(missed) if missed else 'none'}")
    print(f"total wall time: {res.wall:.1f} s")
    print()
    print_summary(res)


def print_header(res: Results) -> None:
    args = res.args
    print()
    print(f"savepoint async save benchmark: torch {torch.__version__}, {os.cpu_count()} CPU cores, "
          f"{torch.get_num_threads()} torch threads, 1-rank gloo group, one process")
    print(f"model: Llama 3 dim {args.dim}, {args.n_layers} layers, {args.n_heads}/{args.n_kv_heads} heads, "
          f"vocab {args.vocab_size}: {res.params / 1e6:.1f}M parameters, fp32 + AdamW state = "
          f"{res.nbytes / 1e9:.3f} GB in memory ({res.sizes['sync_save'] / 1e9:.3f} GB as a savepoint step)")
    print(f"training step: forward + backward + AdamW on {res.batch_size} x {res.seq_len} tokens, {res.step_s:.3f} s "
          f"when calibrated (best of 3); background writer niceness +{staging.WRITER_NICE}")
    print(f"{args.repeats} repeats of each baseline (disk, torch.save, dcp.save, HashingWriter x2, sync save taking "
          f"turns in rotating order); {common.cache_note(res.cold, 'every timed save and disk pass', 'reads')}")
    print()


def print_baselines(res: Results) -> None:
    times, sizes, nbytes = res.times, res.sizes, res.nbytes
    print(f"{'operation':<50} {'median s':>9} {'min - max s':>17} {'GB/s':>7} {'n':>3}")
    print(row("disk write 64 MiB blocks + fdatasync", times["write"], nbytes))
    print(row("disk read back (cold)" if res.cold else "disk read back (warm cache)", times["read"], nbytes))
    print(row("memcpy dst.copy_(src), preallocated dst", res.copies, nbytes,
              f"first copy into a fresh buffer {res.first_copy:.4f} s"))
    print(row("torch.save + fsync", times["torch_save"], sizes["torch_save"]))
    print(row("dcp.save (default planner, no_dist)", times["dcp_save"], sizes["dcp_save"]))
    print(row("dcp.save through HashingWriter (no zip CRC-32)", times["hashing_save"], sizes["hashing_save"]))
    print(row("dcp.save through HashingWriter, CRC-32 kept", times["hashing_crc_save"], sizes["hashing_crc_save"]))
    print(row("savepoint sync save (durable, committed)", times["sync_save"], sizes["sync_save"]))


def print_async_rows(mode: str, r: AsyncResult) -> None:
    print(f"-- {mode}: {len(r.call)} saves with no training between them, then {len(r.loop_blocked)} inside "
          f"a training loop")
    print(row("  first save: save() call", r.call[:1]))
    print(row("  first save: wait_for_staging() right after", r.staging[:1]))
    print(row("  first save: durable (save() -> finish_inflight)", r.durable[:1], r.nbytes))
    if len(r.call) > 1:
        print(row("  later saves: save() call", r.call[1:]))
        print(row("  later saves: wait_for_staging() right after", r.staging[1:]))
        print(row("  later saves: durable (save() -> finish_inflight)", r.durable[1:], r.nbytes))
    print(row("  in loop: blocked (save() + wait before step)", r.loop_blocked, note="save() call alone "
              f"median {median(r.loop_call):.4f} s"))
    print(row("  in loop: durable (save() -> commit by poll)", r.loop_durable, r.nbytes,
              f"{min(r.steps_per_save)}-{max(r.steps_per_save)} steps per save"))
    print(row("  in loop: training step, no save in flight", r.steps_normal))
    print(row("  in loop: training step, save in flight", r.steps_during))


def print_memory(res: Results) -> None:
    print()
    print("memory over the consecutive saves (VmRSS after each save completed):")
    for mode, r in res.modes.items():
        drift = (r.rss[-1] - r.rss[0]) / r.rss[0] * 100
        peak = "VmHWM" if r.peak_is_hwm else "max sampled VmRSS"
        writer = f"; writer process VmRSS {r.writer_rss / 1e9:.3f} GB" if r.writer_rss else ""
        print(f"  {mode}: before {r.rss_before / 1e9:.3f} GB, after save 1 {r.rss[0] / 1e9:.3f} GB, after save "
              f"{len(r.rss)} {r.rss[-1] / 1e9:.3f} GB (drift {drift:+.2f} %), min-max {min(r.rss) / 1e9:.3f}-"
              f"{max(r.rss) / 1e9:.3f} GB, peak ({peak}) {r.peak_rss / 1e9:.3f} GB{writer}")
        if r.pss_before:
            writer = (f", writer process PSS {r.writer_pss / 1e9:.3f} GB (of it shared memory "
                      f"{r.writer_pss_shmem / 1e9:.3f} GB)") if r.writer_pss else ""
            print(f"  {mode}: PSS trainer before {r.pss_before / 1e9:.3f} GB, after the saves "
                  f"{r.pss_after / 1e9:.3f} GB{writer}")
    print()


def print_targets(res: Results) -> list[str]:
    """One line per target, met or not; returns the missed ones."""
    missed = [m for mode, r in res.modes.items() for m in print_async_targets(res, mode, r)]
    missed += print_sync_targets(res)
    for mode, r in res.modes.items():
        if r.pss_before:
            added = r.pss_after + r.writer_pss - r.pss_before
            print(f"{mode}: memory added by the saves, PSS (trainer + writer process) {added / 1e9:.3f} GB = "
                  f"{added / res.nbytes:.2f}x the state (target <= {MEMORY_TARGET:.1f}x: "
                  f"{verdict(added <= MEMORY_TARGET * res.nbytes)})"
                  f"; VmRSS alone would say {(r.peak_rss - r.rss_before + r.writer_rss) / res.nbytes:.2f}x")
            if added > MEMORY_TARGET * res.nbytes:
                missed.append(f"{mode} memory")
    return missed


def print_async_targets(res: Results, mode: str, r: AsyncResult) -> list[str]:
    """What an async mode blocks and slows, against the sync save; returns the targets it missed."""
    sync = median(res.times["sync_save"])
    ratio = median(r.loop_blocked) / sync
    idle = (median(r.call[1:] or r.call) + median(r.staging[1:] or r.staging)) / sync
    print(f"{mode}: blocked / durable sync save: {ratio * 100:.2f} % (target <= {BLOCKED_TARGET * 100:.1f} %: "
          f"{verdict(ratio <= BLOCKED_TARGET)}); first save {(r.call[0] + r.staging[0]) / sync * 100:.1f} %; "
          f"with no training to overlap the staging copy {idle * 100:.2f} %")
    step_ratio = median(r.steps_during) / median(r.steps_normal)
    print(f"{mode}: training step during a save / normal: {step_ratio:.2f}x (target <= {STEP_TARGET:.2f}x: "
          f"{verdict(step_ratio <= STEP_TARGET)}); durable in {median(r.durable[1:] or r.durable) / sync:.2f}x "
          f"the sync save's time with no training, {median(r.loop_durable) / sync:.2f}x inside the loop")
    return [name for name, bad in ((f"{mode} blocked", ratio > BLOCKED_TARGET),
                                   (f"{mode} step time", step_ratio > STEP_TARGET)) if bad]


def sync_figures(res: Results) -> tuple[float, float, float]:
    """(sync save median seconds, its bytes per second, the disk's write bytes per second)."""
    sync = median(res.times["sync_save"])
    return sync, res.sizes["sync_save"] / sync, res.nbytes / median(res.times["write"])


def print_sync_targets(res: Results) -> list[str]:
    """The sync save against the disk and torch.save, and what hashing costs; returns the targets it missed."""
    times, sizes, nbytes = res.times, res.sizes, res.nbytes
    sync, sync_bw, write_bw = sync_figures(res)
    missed = []
    throughput = sync_bw / write_bw
    pairs = [(sizes["sync_save"] / s) / (nbytes / w) for s, w in zip(times["sync_save"], times["write"], strict=True)]
    print(f"sync save throughput / disk write bandwidth: {throughput * 100:.0f} % ({sync_bw / 1e9:.2f} / "
          f"{write_bw / 1e9:.2f} GB/s; target >= {THROUGHPUT_TARGET * 100:.0f} %: "
          f"{verdict(throughput >= THROUGHPUT_TARGET)}); per round {min(pairs) * 100:.0f} - {max(pairs) * 100:.0f} %")
    if throughput < THROUGHPUT_TARGET:
        missed.append("sync throughput")
    line, vs_torch = common.ratio_line("savepoint sync save / (torch.save + fsync)", times["sync_save"],
                                       times["torch_save"], VS_TORCH_TARGET, "per round")
    print(f"{line}; / raw dcp.save {sync / median(times['dcp_save']):.2f}x")
    if vs_torch > VS_TORCH_TARGET:
        missed.append("sync vs torch.save")
    hashing = median(times["hashing_crc_save"]) / median(times["dcp_save"]) - 1
    pairs = [h / d - 1 for h, d in zip(times["hashing_crc_save"], times["dcp_save"], strict=True)]
    net = median(times["hashing_save"]) / median(times["dcp_save"]) - 1
    print(f"hashing cost (dcp.save through HashingWriter with CRC-32 kept / plain FileSystemWriter - 1): "
          f"{hashing * 100:+.1f} % (target <= {HASHING_TARGET * 100:.0f} %: "
          f"{verdict(hashing <= HASHING_TARGET)}); per round {min(pairs) * 100:+.1f} to {max(pairs) * 100:+.1f} %; "
          f"as savepoint writes (xxh3 instead of the CRC-32) {net * 100:+.1f} %")
    if hashing > HASHING_TARGET:
        missed.append("hashing cost")
    return missed


def print_summary(res: Results) -> None:
    sync, sync_bw, write_bw = sync_figures(res)
    vs_torch = sync / median(res.times["torch_save"])
    name = "async_with_pinned_mem" if "async_with_pinned_mem" in res.modes else next(iter(res.modes))
    pinned = res.modes[name]
    print(f"summary: saving {res.sizes['sync_save'] / 1e9:.2f} GB (Llama 3, {res.params / 1e6:.0f}M params + AdamW) "
          f"synchronously took {sync:.2f} s ({sync_bw / 1e9:.2f} GB/s, {sync_bw / write_bw * 100:.0f} % of the disk's "
          f"{write_bw / 1e9:.2f} GB/s, {vs_torch:.2f}x torch.save + fsync); with {name} the training loop was "
          f"blocked {median(pinned.loop_blocked) * 1e3:.1f} ms per save "
          f"({median(pinned.loop_blocked) / sync * 100:.2f} % of the sync save), steps during a save took "
          f"{median(pinned.steps_during) / median(pinned.steps_normal):.2f}x a normal step, and RSS drifted "
          f"{(pinned.rss[-1] - pinned.rss[0]) / pinned.rss[0] * 100:+.2f} % over {len(pinned.rss)} saves "
          f"(medians, {common.machine_note(res.cold)})")
