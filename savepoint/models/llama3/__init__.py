"""Llama 3: model, flavors and the parallelize plan.

``args`` is torch-free (``savepoint.job`` checks configs against it); the torch parts load on first use.
"""

from savepoint.models.llama3.args import LLAMA3_FLAVORS, ModelArgs

__all__ = ["LLAMA3_FLAVORS", "ModelArgs", "Transformer", "build_model"]


def __getattr__(name: str):
    if name in ("Transformer", "build_model"):
        from savepoint.models.llama3 import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
