"""Llama 3: model, flavors and (single-process for now) parallelize seam."""

from savepoint.models.llama3.args import LLAMA3_FLAVORS, ModelArgs
from savepoint.models.llama3.model import Transformer, build_model

__all__ = ["LLAMA3_FLAVORS", "ModelArgs", "Transformer", "build_model"]
