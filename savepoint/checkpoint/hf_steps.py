"""The checkpoint folder's Hugging Face steps: the final save as an HF folder, and the first load from one.

Both are driven by the model's adapter (``HFAdapter``: key and tensor mapping, config, the checks
of an HF folder); nothing here knows a model's keys. The export is written through the same commit
path as every DCP step (``writing.StepWriter.write``).

Under pipeline parallelism each rank holds only its stages' tensors (under their global names): the
export then sends each tensor from the lowest rank holding it to rank 0, which writes the folder a
1-process export would write, and the initial load fills only the tensors each rank holds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from savepoint.checkpoint.coordination import is_rank0
from savepoint.checkpoint.object_folder import downloaded, uploaded_from_local
from savepoint.checkpoint.objstore import ObjectPath, is_url
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

    shapes: dict[str, tuple[int, ...]]  # every key of the whole model and its shape, in the model's order

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

    def export(self, model_sd: dict[str, torch.Tensor], group: dist.ProcessGroup | None = None) -> Produce:
        """The producer of the final save as an HF folder: ``model*.safetensors``, index, config, tokenizer.

        Tensor by tensor, every rank gathers the full tensor (a collective, so all ranks walk the
        same keys in the same order, even after rank 0's writer failed) and rank 0 converts and
        streams it to its shard file: memory holds one tensor, not one shard.

        When this rank holds only some of the model's tensors (its pipeline stages), the ranks first
        exchange which tensors each holds (one gather over ``group``, default: every rank); then, in
        the whole model's order, the ranks holding a tensor gather it and the lowest of them sends
        it to rank 0 over ``group``. The folder is the one a 1-process export of the same weights writes.

        Raises (from the producer):
            CheckpointError: the model has no adapter; no rank holds some tensor of the model; or
                rank 0's writer failed.
        """
        adapter = self.adapter
        if adapter is None:
            raise CheckpointError("--checkpoint.last_save_in_hf: this model has no Hugging Face adapter")
        dtype = torch_dtype(self.cfg.export_dtype)

        def produce(staging: Path) -> bool:
            if isinstance(staging, ObjectPath):  # safetensors writes files: write locally, then upload
                with uploaded_from_local(staging) as local:
                    return produce(local)
            if _holds_part(adapter, model_sd, group):
                _export_pipelined(adapter, model_sd, group, dtype, staging, self._finisher(dtype))
            else:
                self._export_whole(adapter, model_sd, dtype, staging)
            return False

        return produce

    def _finisher(self, dtype: torch.dtype) -> Callable[[StreamingHFWriter], None]:
        """Rank 0's last step of an export: config.json, index and tokenizer files."""
        adapter = self.adapter
        assert adapter is not None
        return lambda writer: writer.finish(adapter.config(dtype, *self.token_ids), self.assets_path)

    def _export_whole(self, adapter: HFAdapter, model_sd: dict[str, torch.Tensor], dtype: torch.dtype,
                      staging: Path) -> None:
        """Every rank holds every tensor (whole or sharded): each gathers it, rank 0 writes it."""
        out_dtype = {k: _out_dtype(v.dtype, dtype) for k, v in model_sd.items()}
        entries = [(k, tuple(v.shape), out_dtype[k]) for k, v in model_sd.items()]
        writer, error = _open_writer(adapter, staging, entries) if is_rank0() else (None, None)
        for key, value in model_sd.items():
            full = value.full_tensor() if isinstance(value, DTensor) else value
            if writer is not None and error is None:
                try:
                    writer.add(*adapter.to_hf(key, full.detach().to("cpu", out_dtype[key])))
                except Exception as e:
                    error = e
        _close_writer(writer, error, self._finisher(dtype))

    def load_initial(self, model: torch.nn.Module) -> None:
        """Load weights from an HF folder (``initial_load_path``, else ``--model.hf_assets_path``) into any layout.

        The whole folder is checked against the model's flavor; then each rank reads the tensors its
        ``model`` holds (under pipeline parallelism, its stages' only) and keeps its shard of each.

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
        if is_url(source):  # safetensors reads files: download the folder first
            with downloaded(ObjectPath(source)) as local:
                return self._load_hf(model, local, source)
        return self._load_hf(model, source, source)

    def _load_hf(self, model: torch.nn.Module, local: Any, source: Any) -> None:
        assert self.adapter is not None
        start = time.perf_counter()
        folder = SafetensorsReader(local)  # plain reads: nothing stays resident after each tensor
        where = f"--checkpoint.initial_load_path={source}" if self.cfg.initial_load_path else \
            f"--model.hf_assets_path={source}"
        sources = self.adapter.plan_load(folder, where)  # the same check as convert_from_hf
        params = dict(model.named_parameters(remove_duplicate=False))
        read = 0
        for ours, hf in sources.items():
            param = params.get(ours)
            if param is None:
                continue  # another pipeline stage's tensor: the rank holding it loads it
            tensor = self.adapter.read_checked(folder, hf)  # NaN/inf refused, naming the tensor
            copy_full_into(param, self.adapter.from_hf(ours, tensor).to(param.dtype))
            read += tensor.numel() * tensor.element_size()
        logger.info("loaded Hugging Face weights from %s (model only): %s", source,
                    rate(read, time.perf_counter() - start))


Entry = tuple[str, tuple[int, ...], torch.dtype]  # (model key, shape, dtype as exported)


def _out_dtype(dtype: torch.dtype, export: torch.dtype) -> torch.dtype:
    """Floating tensors are exported as ``export``; integer and bool ones keep their dtype."""
    return export if dtype.is_floating_point else dtype


def _plan(adapter: HFAdapter, entries: list[Entry]) -> list[Entry]:
    """(HF key, shape, dtype) of every exported tensor, in order: the adapter maps meta tensors (no memory)."""
    plan = []
    for key, shape, dtype in entries:
        hf_key, meta = adapter.to_hf(key, torch.empty(shape, dtype=dtype, device="meta"))
        plan.append((hf_key, tuple(meta.shape), meta.dtype))
    return plan


def _open_writer(adapter: HFAdapter, staging: Path,
                 entries: list[Entry]) -> tuple[StreamingHFWriter | None, Exception | None]:
    """Rank 0's writer of ``entries``, or the error that kept it from opening."""
    try:
        return StreamingHFWriter(staging, _plan(adapter, entries)), None
    except Exception as e:
        return None, e


def _close_writer(writer: StreamingHFWriter | None, error: Exception | None,
                  finish: Callable[[StreamingHFWriter], None]) -> None:
    """Finish (unless some tensor failed) and close rank 0's writer; raise the first error."""
    if writer is not None:
        try:
            if error is None:
                finish(writer)
        finally:
            writer.close()
    if error is not None:
        raise error


def _holds_part(adapter: HFAdapter, model_sd: dict[str, torch.Tensor], group: dist.ProcessGroup | None) -> bool:
    """Whether this rank of a multi-rank job lacks some of the model's tensors: it holds pipeline stages.

    Every rank decides alike without communicating: without pipeline parallelism every rank holds
    every tensor (whole or sharded); with it no rank holds them all (each stage holds some).
    """
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return False
    return not model_sd.keys() >= adapter.shapes.keys()


def _holders(model_sd: dict[str, torch.Tensor],
             group: dist.ProcessGroup | None) -> dict[str, tuple[tuple[int, ...], torch.dtype, list[int]]]:
    """key -> (shape, dtype, the ranks in ``group`` holding it, lowest first), from one gather."""
    mine = [(key, tuple(value.shape), value.dtype) for key, value in model_sd.items()]
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    held: dict[str, tuple[tuple[int, ...], torch.dtype, list[int]]] = {}
    for rank, entries in enumerate(everyone):
        for key, shape, dtype in entries:
            held.setdefault(key, (shape, dtype, []))[2].append(rank)
    return held


def _transfer_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where tensors travel to rank 0: the CPU on a group that has gloo, else this rank's CUDA device (nccl)."""
    if "gloo" in str(dist.get_backend(group)):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _export_pipelined(adapter: HFAdapter, model_sd: dict[str, torch.Tensor], group: dist.ProcessGroup | None,
                      dtype: torch.dtype, staging: Path, finish: Callable[[StreamingHFWriter], None]) -> None:
    """The export when each rank holds some pipeline stages: every tensor reaches rank 0 in the model's order.

    For each tensor, the ranks holding it gather it (a collective over its stage's mesh only) and
    the lowest of them casts it to the export dtype and sends it to rank 0, which writes it. Rank 0
    holds one tensor at a time; it keeps receiving after its writer failed, so no sender hangs.

    Raises:
        CheckpointError: no rank holds some tensor of the model (on every rank alike).
    """
    held = _holders(model_sd, group)
    missing = [key for key in adapter.shapes if key not in held]
    if missing:
        raise CheckpointError(f"--checkpoint.last_save_in_hf: no pipeline stage holds {missing[0]!r} "
                              f"({len(missing)} of the model's tensors are missing); nothing was exported")
    order = [key for key in adapter.shapes if key in held] + sorted(held.keys() - adapter.shapes.keys())
    entries = [(key, held[key][0], _out_dtype(held[key][1], dtype)) for key in order]
    me, device = dist.get_rank(group), _transfer_device(group)
    writer, error = _open_writer(adapter, staging, entries) if me == 0 else (None, None)
    for key, shape, out_dtype in entries:
        holders = held[key][2]
        tensor = None
        if me in holders:
            value = model_sd[key]
            full = value.full_tensor() if isinstance(value, DTensor) else value
            if me == holders[0]:
                tensor = full.detach().to(device if me else "cpu", out_dtype).contiguous()
        if holders[0] != 0 and me == holders[0]:
            dist.send(tensor, group_dst=0, group=group)
        elif holders[0] != 0 and me == 0:
            tensor = torch.empty(shape, dtype=out_dtype, device=device)
            dist.recv(tensor, group_src=holders[0], group=group)
        if writer is not None and error is None:
            try:
                writer.add(*adapter.to_hf(key, tensor.to("cpu")))
            except Exception as e:
                error = e
    _close_writer(writer, error, finish)

__all__ = ["HFAdapter", "HFSteps"]
