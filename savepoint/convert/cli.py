"""``savepoint convert from_hf|to_hf`` and TorchTitan's ``scripts/checkpoint_conversion`` arguments.

Both come through ``run`` (parse and convert, raising one-line errors) and ``main`` (print the
error line and return 1).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

from savepoint.checkpoint.objstore import is_url
from savepoint.checkpoint.storage import location
from savepoint.config.problems import url_problem
from savepoint.convert.dcp_hf import KEEP, convert_from_hf, convert_to_hf
from savepoint.convert.flavors import DEFAULT_FLAVOR, MODEL_NAMES, recorded_flavor, step_flavor
from savepoint.convert.remote import local_input, local_output
from savepoint.dtypes import FLOAT_DTYPES
from savepoint.errors import CheckpointError, ConfigError, SavepointError
from savepoint.hf.folder import DEFAULT_SHARD_BYTES
from savepoint.models.llama3.args import LLAMA3_FLAVORS

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """Bytes in ``5GB`` (10^9), ``4GiB`` (2^30), ``500MB`` or a plain integer."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 5GB, 500MB or 4GiB")
    value = float(match.group(1)) * _UNITS[(match.group(2) or "").upper()]
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a shard must hold at least one byte")
    return int(value)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError([f"{message} (see {self.prog} --help)"])


def build_parser(direction: str, prog: str | None = None) -> argparse.ArgumentParser:
    """The arguments of one direction, as in TorchTitan's ``scripts/checkpoint_conversion``."""
    if direction == "from_hf":
        parser = _Parser(prog=prog or "savepoint convert from_hf",
                         description="Convert a Hugging Face Llama 3 folder into a model-only DCP checkpoint.")
        parser.add_argument("input_dir", help="HF model folder (model.safetensors or shards + index)")
        parser.add_argument("output_dir", help="new DCP checkpoint folder (must not exist or be empty)")
    else:
        parser = _Parser(prog=prog or "savepoint convert to_hf",
                         description="Convert a DCP checkpoint step folder into a Hugging Face Llama 3 folder.")
        parser.add_argument("input_dir", help="DCP step folder (full or model-only checkpoint)")
        parser.add_argument("output_dir", help="new HF folder (must not exist or be empty)")
        parser.add_argument("--hf_assets_path", default=None,
                            help="folder with tokenizer files to copy (e.g. the original HF model folder)")
    parser.add_argument("--model_name", default="llama3", choices=MODEL_NAMES)
    if direction == "from_hf":
        parser.add_argument("--model_flavor", default=DEFAULT_FLAVOR,
                            help=f"one of {', '.join(LLAMA3_FLAVORS)} (default {DEFAULT_FLAVOR})")
    else:
        parser.add_argument("--model_flavor", default=None,
                            help=f"one of {', '.join(LLAMA3_FLAVORS)} (default: the flavor the step's manifest.json "
                                 f"records; {DEFAULT_FLAVOR} for a step without one); must match the recorded one")
    if direction == "from_hf":
        parser.add_argument("--dtype", default="float32", choices=[*FLOAT_DTYPES, KEEP],
                            help="dtype of the DCP tensors (default float32, for training; keep: as stored in HF)")
    else:
        parser.add_argument("--export_dtype", default="float32", choices=list(FLOAT_DTYPES))
        parser.add_argument("--max_shard_size", type=parse_size, default=DEFAULT_SHARD_BYTES,
                            help="the most bytes per safetensors shard, e.g. 5GB or 4GiB (default 5GiB)")
    return parser


def run(argv: list[str], prog: str | None = None) -> Path:
    """``from_hf|to_hf IN OUT [options]``: parse and convert; returns the output folder.

    Raises:
        SavepointError: bad arguments or a failed conversion (one line each).
    """
    if not argv or argv[0] not in ("from_hf", "to_hf"):
        if argv and argv[0] in ("-h", "--help"):
            print("usage: savepoint convert {from_hf,to_hf} IN OUT --model_flavor F [options]\n"
                  "       savepoint convert from_hf --help | to_hf --help")
            raise SystemExit(0)
        raise SavepointError("usage: savepoint convert {from_hf,to_hf} IN OUT --model_flavor F [options]")
    direction = argv[0]
    ns = build_parser(direction, prog).parse_args(argv[1:])
    urls = [*url_problem(f"{direction}: input", ns.input_dir, " ", s3=True),
            *url_problem(f"{direction}: output", ns.output_dir, " ", s3=True),
            *url_problem("--hf_assets_path", getattr(ns, "hf_assets_path", None))]
    if urls:
        raise ConfigError(urls)
    try:
        with local_input(ns.input_dir, hf=direction == "from_hf") as in_dir, local_output(ns.output_dir) as out_dir:
            out = _convert(direction, ns, in_dir, out_dir)
    except CheckpointError as e:
        # The adapter's messages name the training flag; here the flag is --model_flavor.
        raise CheckpointError(str(e).replace("--model.flavor", "--model_flavor")) from e
    if is_url(ns.output_dir):
        out = ns.output_dir
    print(f"wrote {out}")
    return out


def _convert(direction: str, ns: argparse.Namespace, in_dir: str, out_dir: str) -> Any:
    if direction == "from_hf":
        return convert_from_hf(in_dir, out_dir, ns.model_flavor, dtype=ns.dtype)
    flavor = step_flavor(in_dir, ns.model_flavor)
    if ns.model_flavor is None:
        how = "as its manifest.json records" if recorded_flavor(location(in_dir)) else \
            "the default: the step has no manifest.json recording one"
        print(f"converting {ns.input_dir} as Llama 3 {flavor} ({how}; --model_flavor overrides)")
    return convert_to_hf(in_dir, out_dir, flavor, hf_assets_path=ns.hf_assets_path,
                         export_dtype=ns.export_dtype, max_shard_bytes=ns.max_shard_size)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run a conversion; on failure print one ``error: ...`` line on stderr and return 1.

    With ``SAVEPOINT_DEBUG`` set, errors raise with their traceback instead.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        run(argv, prog)
    except SavepointError as e:
        if os.environ.get("SAVEPOINT_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0
