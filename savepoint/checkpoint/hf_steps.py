"""The checkpoint folder's Hugging Face steps: the final save as an HF folder, and the first load from one.

Both are driven by the model's adapter (``HFAdapter``: key and tensor mapping, config, the checks
of an HF folder); nothing here knows a model's keys. The export is written through the same commit
path as every DCP step (``writing.StepWriter.write``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.distributed.tensor import DTensor

from savepoint.checkpoint.coordination import is_rank0
from savepoint.checkpoint.rates import rate
from savepoint.checkpoint.writing import Produce
from savepoint.config.job_config import Checkpoint as CheckpointConfig
from savepoint.distributed import copy_full_into
from savepoint.dtypes import torch_dtype
from savepoint.errors import CheckpointError
from savepoint.hf.assets import check_export_assets
from savepoint.hf.folder import HFFolder, SafetensorsReader, StreamingHFWriter

logger = logging.getLogger(__name__)

class HFAdapter(Protocol):
    """What the checkpointer needs of a model's Hugging Face mapping (``savepoint.hf.llama3.Llama3HFAdapter``)."""

    def to_hf(self, key: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]: ...

    def from_hf(self, key: str, tensor: torch.Tensor) -> torch.Tensor: ...

    def config(self, dtype: torch.dtype, bos_token_id: Any = None, eos_token_id: Any = None) -> dict[str, Any]: ...

    def plan_load(self, folder: HFFolder, where: str) -> dict[str, str]: ...

    def read_checked(self, folder: HFFolder, hf: str) -> torch.Tensor: ...


class HFSteps:
    """The HF export (``last_save_in_hf``) and the initial HF load (``initial_load_in_hf``) of one job.

    Args:
        cfg: the ``[checkpoint]`` section.
        adapter: the model's HF mapping; None for a model without one (both then fail, saying so).
        assets_path: ``--model.hf_assets_path``: tokenizer files copied into the export, and the HF
            folder ``initial_load_in_hf`` reads when ``initial_load_path`` is unset.
    """

    def __init__(self, cfg: CheckpointConfig, adapter: HFAdapter | None, assets_path: str | None):
        self.cfg, self.adapter, self.assets_path = cfg, adapter, assets_path
        # The final save's export copies tokenizer files: check them now, not after the whole run.
        exports = cfg.enable and not cfg.load_only and cfg.last_save_in_hf and cfg.last_save_model_only
        self.token_ids = check_export_assets(assets_path, "--model.hf_assets_path") if exports else (None, None)

    def export(self, model_sd: dict[str, torch.Tensor]) -> Produce:
        """The producer of the final save as an HF folder: ``model*.safetensors``, index, config, tokenizer.

        Tensor by tensor, every rank gathers the full tensor (a collective, so all ranks walk the
        same keys in the same order, even after rank 0's writer failed) and rank 0 converts and
        streams it to its shard file: memory holds one tensor, not one shard.

        Raises (from the producer):
            CheckpointError: the model has no adapter; or rank 0's writer failed.
        """
        adapter = self.adapter
        if adapter is None:
            raise CheckpointError("--checkpoint.last_save_in_hf: this model has no Hugging Face adapter")
        dtype = torch_dtype(self.cfg.export_dtype)
        out_dtype = {k: dtype if torch.is_floating_point(v) else v.dtype for k, v in model_sd.items()}

        def produce(staging: Path) -> bool:
            writer, error = None, None
            if is_rank0():
                try:
                    writer = StreamingHFWriter(staging, _plan(adapter, model_sd, out_dtype))
                except Exception as e:
                    error = e
            for key, value in model_sd.items():
                full = value.full_tensor() if isinstance(value, DTensor) else value
                if writer is not None and error is None:
                    try:
                        writer.add(*adapter.to_hf(key, full.detach().to("cpu", out_dtype[key])))
                    except Exception as e:
                        error = e
            if writer is not None:
                try:
                    if error is None:
                        writer.finish(adapter.config(dtype, *self.token_ids), self.assets_path)
                finally:
                    writer.close()
            if error is not None:
                raise error
            return False

        return produce

    def load_initial(self, model: torch.nn.Module) -> None:
        """Load weights from an HF folder (``initial_load_path``, else ``--model.hf_assets_path``) into any layout.

        Raises:
            CheckpointError: no folder or adapter, or the folder does not fit the model (``plan_load``),
                or a tensor holds non-finite values.
        """
        source = self.cfg.initial_load_path or self.assets_path
        if source is None:
            raise CheckpointError("--checkpoint.initial_load_in_hf needs a folder: set --checkpoint.initial_load_path "
                                  "(or --model.hf_assets_path) to a Hugging Face model folder")
        if self.adapter is None:
            raise CheckpointError("--checkpoint.initial_load_in_hf: this model has no Hugging Face adapter")
        start = time.perf_counter()
        folder = SafetensorsReader(source)  # plain reads: nothing stays resident after each tensor
        where = f"--checkpoint.initial_load_path={source}" if self.cfg.initial_load_path else \
            f"--model.hf_assets_path={source}"
        sources = self.adapter.plan_load(folder, where)  # the same check as convert_from_hf
        for ours, hf in sources.items():
            param = model.get_parameter(ours)
            tensor = self.adapter.read_checked(folder, hf)  # NaN/inf refused, naming the tensor
            copy_full_into(param, self.adapter.from_hf(ours, tensor).to(param.dtype))
        logger.info("loaded Hugging Face weights from %s (model only): %s", source,
                    rate(folder.total_bytes(), time.perf_counter() - start))


def _plan(adapter: HFAdapter, model_sd: dict[str, torch.Tensor],
          out_dtype: dict[str, torch.dtype]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(HF key, shape, dtype) of every exported tensor, in order: the adapter maps meta tensors (no memory)."""
    plan = []
    for key, value in model_sd.items():
        hf_key, meta = adapter.to_hf(key, torch.empty(value.shape, dtype=out_dtype[key], device="meta"))
        plan.append((hf_key, tuple(meta.shape), meta.dtype))
    return plan


__all__ = ["HFAdapter", "HFSteps"]
