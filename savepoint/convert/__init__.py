"""Converters beside the trainer: DCP step folders to and from Hugging Face folders, and to torchtune.

    dcp_hf      convert_from_hf, convert_to_hf: one tensor at a time, checked before a byte is written
    flavors     the Llama 3 flavor a conversion uses (given, or recorded in the step's manifest)
    output      the hidden ``.<name>.partial`` output folder, published whole or not at all
    progress    the progress line on stderr
    cli         ``savepoint convert from_hf|to_hf`` and the ``scripts/checkpoint_conversion`` scripts
    torchtune   a step folder as a torchtune state dict or ``.pt`` file

They may use ``savepoint.checkpoint`` and ``savepoint.hf``; neither of those imports them.
"""

from savepoint.convert.cli import build_parser, main, parse_size, run
from savepoint.convert.dcp_hf import SafetensorsReader, check_dcp_keys, convert_from_hf, convert_to_hf
from savepoint.convert.output import partial_path
from savepoint.convert.progress import Progress

# SafetensorsReader: the HF reader convert_from_hf reads with (tests and benchmarks swap its read).
__all__ = ["Progress", "SafetensorsReader", "build_parser", "check_dcp_keys", "convert_from_hf", "convert_to_hf",
           "main", "parse_size", "partial_path", "run"]
