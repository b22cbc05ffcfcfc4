"""Benchmark: memory of one forward + backward with each activation-checkpointing mode, side by side.

    .venv/bin/python benchmarks/ac_memory.py                    # debug model, 4 x 256 tokens
    .venv/bin/python benchmarks/ac_memory.py --batch 8 --seq-len 512 --layers 8

Every figure comes from torch's own allocator accounting: the profiler with ``profile_memory``
records each CPU allocation and free, so the running sum is the exact number of tensor bytes alive
(no sampling, unlike RSS). For each mode the script reports

- ``after forward``: tensor bytes the forward leaves alive, i.e. what autograd keeps for backward
  (the logits included), relative to before the forward;
- ``peak``: the highest live tensor bytes during forward + backward, relative to before the forward;

and both as a ratio to no checkpointing. The weights are the same in every mode (one seeded init)
and so are the losses, which the script checks.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

from savepoint.models.llama3 import LLAMA3_FLAVORS, build_model
from savepoint.models.llama3.activation_checkpoint import apply_ac

MODES = [("none", "2"), ("selective", "2"), ("selective", "op"), ("full", "2")]


def measure(args: argparse.Namespace, mode: str, option: str) -> tuple[float, int, int]:
    """(loss, bytes alive after forward, peak bytes during forward + backward) for one mode."""
    model_args = dataclasses.replace(LLAMA3_FLAVORS["debugmodel"], n_layers=args.layers).with_max_seq_len(
        args.seq_len)
    model = build_model(model_args, seed=0)
    apply_ac(model, mode, option)
    tokens = torch.randint(0, model_args.vocab_size, (args.batch, args.seq_len + 1),
                           generator=torch.Generator().manual_seed(0))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("forward"):
            loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        with record_function("backward"):
            loss.backward()
    events = prof.profiler.kineto_results.events()  # the raw records: one "[memory]" per allocation or free
    backward_start = min(e.start_ns() for e in events if e.name() == "backward")
    allocations = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    live = peak = after_forward = 0
    for start, delta in allocations:
        if start >= backward_start and after_forward == 0:
            after_forward = live
        live += delta
        peak = max(peak, live)
    return loss.item(), after_forward, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = {f"{m} {o}" if m == "selective" else m: measure(args, m, o) for m, o in MODES}
    base_loss, base_fwd, base_peak = results["none"]
    print(f"debug model ({args.layers} layers, dim 256), batch {args.batch} x {args.seq_len} tokens, float32 CPU")
    print(f"{'mode':<14} {'after forward':>14} {'ratio':>6} {'peak':>10} {'ratio':>6}  loss")
    for name, (loss, fwd, peak) in results.items():
        print(f"{name:<14} {fwd / 2**20:>11.1f} MiB {fwd / base_fwd:>6.2f} {peak / 2**20:>6.1f} MiB "
              f"{peak / base_peak:>6.2f}  {loss:.6f}")
        if loss != base_loss:
            raise SystemExit(f"{name}: loss {loss} differs from no checkpointing's {base_loss}")


if __name__ == "__main__":
    main()
