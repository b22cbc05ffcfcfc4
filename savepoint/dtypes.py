"""The floating dtypes a user names (``--export_dtype``, ``--dtype``, config values) and their torch dtypes.

A leaf module: the names import nothing, so config validation can check a value without torch;
``torch_dtype`` imports torch when it is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

FLOAT_DTYPES = ("float32", "bfloat16", "float16")  # the dtypes a checkpoint or export can be written in


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of one of ``FLOAT_DTYPES``.

    Raises:
        ValueError: ``name`` is not one of them.
    """
    if name not in FLOAT_DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(FLOAT_DTYPES)}")
    import torch

    return getattr(torch, name)
