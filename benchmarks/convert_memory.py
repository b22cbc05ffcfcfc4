"""Benchmark: peak memory (RSS) of the offline HF <-> DCP converters against the largest tensor.

    .venv/bin/python benchmarks/convert_memory.py             # ~350M-parameter Llama 3, bf16 HF folder (~0.7 GB)
    .venv/bin/python benchmarks/convert_memory.py --compare   # also the variants savepoint does not use
    .venv/bin/python benchmarks/convert_memory.py --quick     # a small smoke run (a ~70M-parameter model)

Run it from the repository root with the venv's interpreter (``bash scripts/bootstrap.sh`` makes
``.venv`` in a fresh clone; see ``benchmarks/_common.py``). The child processes use the same
interpreter, so they import the same savepoint.

The model has Llama 3's 128256-token vocabulary, so its largest tensors (embedding and output,
128256 x 1024) are a large share of it, as in the 8B model (where they are 2 of 16 GB in bf16).
This process writes a random bf16 HF folder (sharded, with an index) and then runs each conversion
in a child process of its own, which reports its peak RSS (``VmHWM`` in ``/proc/self/status``,
which counts file-backed pages such as mmapped files too). Every figure is compared with the goal
``3 x largest tensor + 300 MB``, the largest tensor taken in float32 (the DCP side's dtype), and
with the baseline RSS of a child that only imports torch (and one that imports the converter).

``--compare`` adds two variants that savepoint does not use, to show why: reading HF tensors
through the safetensors mmap (``HFFolder.read``), whose touched pages stay resident while a file
is open, and writing with ``HFWriter``, which holds a whole shard (5 GiB by default) in memory.
Files live in a temporary folder (under ``--dir`` if given) that is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import work_folder

from savepoint.hf.folder import HFWriter
from savepoint.hf.llama3 import Llama3HFAdapter, hf_config
from savepoint.models.llama3.args import ModelArgs

MODEL = dict(dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, vocab_size=128256, multiple_of=256,
             ffn_dim_multiplier=1.3)
QUICK_MODEL = {**MODEL, "dim": 256, "n_layers": 2}  # the same vocabulary: the largest tensors stay large
MB = 1e6

# A child: register the benchmark flavor, optionally swap in a variant, run the converter's main().
CHILD = """
import sys, json
from savepoint.models.llama3.args import LLAMA3_FLAVORS, ModelArgs
LLAMA3_FLAVORS["bench"] = ModelArgs(**json.loads({model!r}))
from savepoint import convert
from savepoint.convert import dcp_hf
{variant}
code = convert.main({argv!r})
""" + "\n"
VARIANTS = {
    "": "",
    "mmap": "from savepoint.hf.folder import HFFolder\nconvert.SafetensorsReader.read = HFFolder.read",
    "hfwriter": (
        "from savepoint.hf.folder import HFWriter\n"
        "class W(HFWriter):\n"
        "    def __init__(self, out_dir, plan, max_shard_bytes):\n"
        "        super().__init__(out_dir, max_shard_bytes)\n"
        "    def close(self):\n"
        "        pass\n"
        "dcp_hf.StreamingHFWriter = W"
    ),
}


# Appended to every child: its own peak RSS. (Not ru_maxrss from wait4: a forked child's counts the
# parent's pages from before the exec, so it reads this process's RSS, not the child's.)
REPORT = """
peak = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
print("VmHWM_KB", peak, flush=True)
sys.exit(code)
"""


def measure(code: str) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of ``python -c code``; fails loudly if the child fails."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", "import sys\ncode = 0\n" + code + REPORT], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"child failed:\n{done.stderr}")
    peak_kb = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("VmHWM_KB")][0]
    return int(peak_kb) * 1024 / MB, seconds


def convert_code(model: dict, argv: list[str], variant: str = "") -> str:
    return CHILD.format(model=json.dumps(model), variant=VARIANTS[variant], argv=argv)


def write_hf_folder(path: Path, args: ModelArgs, shard_bytes: int) -> tuple[int, int]:
    """A random bf16 HF folder for ``args``; returns (total bytes, largest tensor's element count)."""
    adapter = Llama3HFAdapter(args, "bench")
    writer = HFWriter(path, max_shard_bytes=shard_bytes)
    gen = torch.Generator().manual_seed(0)
    for key, shape in adapter.shapes.items():
        tensor = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        hf_key, hf_tensor = adapter.to_hf(key, tensor)
        writer.add(hf_key, hf_tensor)
    writer.finish(hf_config(args, torch.bfloat16))
    return writer.total_bytes, max(torch.Size(s).numel() for s in adapter.shapes.values())


def conversions(work: Path, model: dict, compare: bool) -> list[tuple[str, float, float]]:
    """(name, peak RSS in MB, seconds) of the baselines and of each conversion of the folder ``work/hf``."""
    rows: list[tuple[str, float, float]] = []
    rows.append(("baseline: import torch", *measure("import torch")))
    rows.append(("baseline: import savepoint.convert", *measure("import savepoint.convert")))
    hf, dcp_dir = str(work / "hf"), str(work / "dcp")
    rows.append(("from_hf  bf16 HF -> fp32 DCP",
                 *measure(convert_code(model, ["from_hf", hf, dcp_dir, "--model_flavor", "bench"]))))
    rows.append(("to_hf    fp32 DCP -> fp32 HF (5 GiB shards)",
                 *measure(convert_code(model, ["to_hf", dcp_dir, str(work / "hf32"), "--model_flavor", "bench"]))))
    shutil.rmtree(work / "hf32")
    rows.append(("to_hf    fp32 DCP -> bf16 HF (5 GiB shards)",
                 *measure(convert_code(model, ["to_hf", dcp_dir, str(work / "hf16"), "--model_flavor", "bench",
                                               "--export_dtype", "bfloat16"]))))
    shutil.rmtree(work / "hf16")
    if compare:
        shutil.rmtree(work / "dcp")
        rows.append(("[not used] from_hf via HFFolder.read (mmap)",
                     *measure(convert_code(model, ["from_hf", hf, dcp_dir, "--model_flavor", "bench"], "mmap"))))
        rows.append(("[not used] to_hf fp32 via HFWriter (holds a shard)",
                     *measure(convert_code(model, ["to_hf", dcp_dir, str(work / "hfw"), "--model_flavor", "bench"],
                                           "hfwriter"))))
    return rows


def print_table(rows: list[tuple[str, float, float]], largest32: float, goal: float) -> None:
    base = rows[0][1]
    print(f"\n{'run':<52} {'peak RSS':>10} {'- torch':>9} {'/ largest':>10} {'vs goal':>9} {'time':>7}")
    for name, rss, seconds in rows:
        verdict = "" if name.startswith("baseline") else ("ok" if rss <= goal else "OVER")
        print(f"{name:<52} {rss:>7,.0f} MB {rss - base:>6,.0f} MB {rss / largest32:>9.2f}x "
              f"{verdict:>9} {seconds:>6.1f}s")
    print(f"\n('- torch': above the {base:,.0f} MB of a child that only imports torch; "
          f"'/ largest': peak RSS over the {largest32:,.0f} MB fp32 largest tensor)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=None, help="where to put the temporary folders")
    parser.add_argument("--compare", action="store_true", help="also run the variants savepoint does not use")
    parser.add_argument("--quick", action="store_true", help="a small model (dim 256, 2 layers): a smoke run")
    opts = parser.parse_args()

    model = QUICK_MODEL if opts.quick else MODEL
    with work_folder("convert_memory_", opts.dir) as work:
        start = time.perf_counter()
        total, largest_numel = write_hf_folder(work / "hf", ModelArgs(**model), shard_bytes=300 * 10**6)
        params = total // 2
        largest32 = largest_numel * 4 / MB
        goal = 3 * largest32 + 300
        shards = len(list((work / "hf").glob("*.safetensors")))
        print(f"model: {params / 1e6:.0f}M parameters; HF folder {total / MB:,.0f} MB bf16 in {shards} shards "
              f"(written in {time.perf_counter() - start:.1f} s); the whole model in fp32: {params * 4 / MB:,.0f} MB")
        print(f"largest tensor: {largest_numel:,} elements = {largest32 / 2:,.0f} MB bf16, {largest32:,.0f} MB fp32; "
              f"goal 3 x {largest32:,.0f} + 300 = {goal:,.0f} MB")
        print_table(conversions(work, model, opts.compare), largest32, goal)

if __name__ == "__main__":
    main()
