"""Offline conversion between Hugging Face Llama 3 folders and savepoint (TorchTitan-style) DCP checkpoints.

    convert_from_hf(IN, OUT, flavor)   HF safetensors folder -> model-only DCP folder (``.metadata`` +
                                       ``__0_0.distcp``, flat model keys: load it with
                                       ``--checkpoint.initial_load_path OUT`` or put it at ``<folder>/step-0``)
    convert_to_hf(IN, OUT, flavor)     DCP step folder (full training or model-only checkpoint, saved at any
                                       world size and layout) -> HF folder (weights, index, ``config.json``,
                                       tokenizer files from ``--hf_assets_path``)

Unlike TorchTitan's scripts, which build the whole model in fp32 first (about 32 GB for 8B), both
directions move one tensor at a time, so memory stays at a few times the largest tensor:

* HF -> DCP: ``dcp.save`` gets *meta* tensors (shapes and dtypes, no memory) and a planner whose
  ``resolve_data`` reads the one tensor the writer asks for, permutes q/k and casts it. DCP's
  ``FileSystemWriter`` resolves and writes items one after another, and keeps a reference to each in
  a dict it only uses for safetensors output, so the planner frees a tensor's storage once the next
  one is asked for. Tensors are read with plain file reads into fresh memory, not through the
  safetensors mmap, whose touched pages would stay resident until the file is closed.
* DCP -> HF: one ``dcp.load`` per tensor into a tensor of its stored shape (DCP assembles it from
  whatever chunks and column tiles the ranks wrote). The output shards are planned up front from the
  shapes, so each shard's header is written first and every tensor goes to disk as soon as it is
  converted (``HFWriter`` alone holds a whole shard, up to 5 GiB, in memory). ``.metadata`` is read once.

Freed heap memory is handed back to the OS after each tensor (``malloc_trim``). Measured by
``benchmarks/convert_memory.py`` (372M parameters, largest tensor 525 MB in fp32, ``import torch``
alone 230 MB): peak RSS 1.1 GB for bf16 HF -> fp32 DCP, 1.4 GB for fp32 DCP -> fp32 HF.

Dtypes: ``convert_from_hf`` writes float32 by default, like TorchTitan: the checkpoint initialises an
fp32 training model (``--dtype bfloat16|float16`` casts to those, ``--dtype keep`` keeps each tensor's
stored dtype). ``convert_to_hf`` writes ``--export_dtype`` (float32 by default, as TorchTitan).
An HF folder whose weights are integer or bool is refused (a Llama holds only floats).

Safety: the HF folder is untrusted (see ``HFFolder``). Keys, shapes, dtypes and ``config.json``
(head counts, value types) are validated against the flavor before a byte is written, each tensor
is refused if it holds NaN or inf, and an error names the first bad tensor or value. Output goes to a hidden sibling
``.<name>.partial`` that is renamed to OUT only when complete (a failed or interrupted conversion
leaves no OUT); an existing non-empty OUT is refused and never touched.

The scripts ``scripts/checkpoint_conversion/convert_{from,to}_hf.py`` and ``savepoint convert`` both
come through ``run``/``main`` in ``savepoint/convert/cli.py``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import SerializationFormat
from torch.distributed.checkpoint.planner import WriteItem, WriteItemType

from savepoint.checkpoint.coordination import as_savepoint_error
from savepoint.checkpoint.fit import check_model_fits
from savepoint.checkpoint.object_folder import listing
from savepoint.checkpoint.objstore import ObjectPath, is_url
from savepoint.checkpoint.reader import VerifyingReader
from savepoint.checkpoint.safe_load import SafeLoadPlanner
from savepoint.convert.flavors import resolve_flavor, step_flavor
from savepoint.convert.output import check_output, staged_output
from savepoint.convert.progress import Progress
from savepoint.dtypes import FLOAT_DTYPES, torch_dtype
from savepoint.durable import DCP_MARKER, HF_INDEX
from savepoint.errors import CheckpointError, ConfigError
from savepoint.hf.assets import check_export_assets
from savepoint.hf.folder import DEFAULT_SHARD_BYTES, SINGLE, SafetensorsReader, StreamingHFWriter, nbytes_of
from savepoint.hf.llama3 import Llama3HFAdapter, hf_config, to_hf_key
from savepoint.models.llama3.args import ModelArgs

logger = logging.getLogger(__name__)

KEEP = "keep"  # --dtype keep: each tensor in the dtype the HF folder stores it in
_DIST_WARNING = "torch.distributed is disabled"


def _dtype(name: str, option: str, keep_ok: bool = False) -> torch.dtype | None:
    if keep_ok and name == KEEP:
        return None
    if name not in FLOAT_DTYPES:
        choices = [*FLOAT_DTYPES, KEEP] if keep_ok else list(FLOAT_DTYPES)
        raise ConfigError([f"{option} {name!r} is not supported; choose from {', '.join(choices)}"])
    return torch_dtype(name)


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``tensor`` in ``dtype``; None, and integer or bool tensors, keep their dtype."""
    if dtype is None or tensor.dtype == dtype or not tensor.is_floating_point():
        return tensor
    return tensor.to(dtype)


def _target_dtype(stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    return stored if dtype is None or not stored.is_floating_point else dtype


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_memory() -> None:
    """Return freed heap memory to the OS.

    glibc keeps freed blocks below its mmap threshold on the heap, and that threshold rises to 32 MB
    once a large tensor is freed, so the layers' tensors would leave a few hundred MB resident
    (measured: +210 MB of peak RSS for a 372M-parameter model). A no-op without glibc.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@contextmanager
def _quiet_dcp() -> Iterator[None]:
    """Silence DCP's 'torch.distributed is disabled ... single process' warning: it is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DIST_WARNING)
        yield


class _FromHFPlanner(DefaultSavePlanner):
    """Resolves each (meta) tensor of the state dict by reading and converting it from the HF folder."""

    def __init__(self, convert: Callable[[str], torch.Tensor], progress: Progress):
        super().__init__()
        self.convert = convert
        self.progress = progress
        self._last: torch.Tensor | None = None

    def resolve_data(self, write_item: WriteItem) -> Any:
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        self.release()
        tensor = self.convert(write_item.index.fqn)
        if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != tensor.nbytes:
            tensor = tensor.clone(memory_format=torch.contiguous_format)  # what the writer would do anyway
        self._last = tensor
        self.progress.update(tensor.nbytes)
        return tensor

    def release(self) -> None:
        """Free the previous tensor: the writer has written it, but keeps a reference until the file is done."""
        if self._last is not None:
            try:
                self._last.untyped_storage().resize_(0)
            except RuntimeError:
                pass  # a storage we cannot resize: it stays until the save ends
            self._last = None
            release_memory()


def _serial_writer(path: Path) -> FileSystemWriter:
    """A writer that resolves each item just before writing it, which ``_FromHFPlanner.release`` relies on.

    ``per_thread_copy_ahead=0``: with CUDA available, DCP's default would use its overlapping loader,
    which resolves up to 10 MB of items ahead of the write. One thread; torch.save serialization
    (the safetensors one reads the kept references at the end of the file).
    """
    return FileSystemWriter(str(path), thread_count=1, per_thread_copy_ahead=0,
                            serialization_format=SerializationFormat.TORCH_SAVE)


def convert_from_hf(in_dir: str | Path, out_dir: str | Path, flavor: str | ModelArgs, dtype: str = "float32",
                    progress: bool = True) -> Path:
    """Convert an HF Llama 3 safetensors folder into a model-only DCP checkpoint folder ``out_dir``.

    Args:
        flavor: a ``LLAMA3_FLAVORS`` name or ``ModelArgs``; the folder must hold exactly its tensors.
        dtype: ``float32`` (default), ``bfloat16``, ``float16`` or ``keep`` (as stored in HF).
        progress: show progress on stderr.

    Returns:
        ``out_dir`` (absolute).

    Raises:
        CheckpointError: the input is not a complete, readable HF folder of this flavor (naming the
            first missing, unknown or misshapen tensor), or ``out_dir`` exists and is not empty.
        ConfigError: an unknown flavor or dtype.
    """
    name, args = resolve_flavor(flavor)
    target = _dtype(dtype, "--dtype", keep_ok=True)
    adapter = Llama3HFAdapter(args, name)
    check_output(out_dir)
    folder = SafetensorsReader(in_dir)
    where = str(folder.path)
    sources = adapter.plan_load(folder, where)  # the same check as --checkpoint.initial_load_in_hf

    dtypes = {ours: _target_dtype(folder.dtype(hf), target) for ours, hf in sources.items()}
    meta = {ours: torch.empty(adapter.shapes[ours], dtype=dtypes[ours], device="meta") for ours in sources}
    total = sum(nbytes_of(adapter.shapes[ours], dtypes[ours]) for ours in sources)

    def convert(ours: str) -> torch.Tensor:
        raw = adapter.read_checked(folder, sources[ours])
        if dtypes[ours].itemsize < raw.dtype.itemsize:  # cast first when it shrinks, permute first when it grows
            return adapter.from_hf(ours, _cast(raw, dtypes[ours]))
        return _cast(adapter.from_hf(ours, raw), dtypes[ours])

    bar = Progress(f"{where} -> DCP", len(meta), total, enabled=progress)
    with staged_output(out_dir) as partial:
        planner = _FromHFPlanner(convert, bar)
        try:
            with _quiet_dcp():
                dcp.save(meta, storage_writer=_serial_writer(partial), planner=planner, no_dist=True)
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
            raise as_savepoint_error(e, f"writing the DCP checkpoint into {partial}") from e
        finally:
            planner.release()
    bar.close()
    return Path(os.path.abspath(out_dir))


def _is_model_key(key: str) -> bool:
    try:
        to_hf_key(key)
    except CheckpointError:
        return False
    return True


def check_dcp_keys(adapter: Llama3HFAdapter, saved: dict[str, Any], where: str) -> None:
    """Check a DCP checkpoint's entries (``state_dict_metadata``) hold the flavor's model tensors.

    Other entries (optimizer, lr_scheduler, dataloader, train_state) are ignored.

    Raises:
        CheckpointError: naming the first model tensor that is missing, has no place in the flavor,
            is not a tensor, or has the wrong shape.
    """
    check_model_fits(saved, adapter.shapes, where, flag="--model_flavor", model=f"Llama 3 {adapter.flavor} model",
                     family=_is_model_key)


def _read_dcp_metadata(src: Any, reader: VerifyingReader) -> dict[str, Any]:
    if isinstance(src, ObjectPath):
        names = listing(src)
        if DCP_MARKER not in names:
            hint = " (it is a Hugging Face folder already)" if HF_INDEX in names or SINGLE in names else ""
            raise CheckpointError(f"{src} has no {DCP_MARKER}: it is not a DCP checkpoint step{hint}; point at a "
                                  "step-N prefix")
        return dict(reader.read_metadata().state_dict_metadata)
    if not src.is_dir():
        raise CheckpointError(f"{src} is not a folder; point at a DCP checkpoint step folder (holding {DCP_MARKER})")
    if not (src / DCP_MARKER).is_file():
        steps = sorted((p.name for p in src.iterdir() if re.fullmatch(r"step-\d+", p.name)),
                       key=lambda s: int(s.split("-")[1]))
        hint = f"; it holds {', '.join(steps)}: point at one of them" if steps else ""
        if (src / HF_INDEX).is_file() or (src / SINGLE).is_file():
            hint = " (it is a Hugging Face folder already)"
        raise CheckpointError(f"{src} has no {DCP_MARKER}: it is not a DCP checkpoint step folder{hint}")
    try:
        return dict(reader.read_metadata().state_dict_metadata)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{src}/{DCP_MARKER} is not readable DCP metadata ({type(e).__name__}: {e})") from e


def _load_one(reader: VerifyingReader, key: str, shape: tuple[int, ...], dtype: torch.dtype,
              src: Path) -> torch.Tensor:
    """The tensor ``key`` of the step, in ``dtype``: one ``dcp.load`` (DCP assembles its chunks and tiles)."""
    # DCP copies what it reads into this tensor, casting as Tensor.to would: no second copy to cast.
    tensor = torch.empty(shape, dtype=dtype)
    try:
        with _quiet_dcp():
            dcp.load({key: tensor}, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=True)
    except (Exception, CheckpointException) as e:
        raise as_savepoint_error(e, f"reading {key!r} from {src}") from e
    return tensor


def convert_to_hf(in_dir: str | Path, out_dir: str | Path, flavor: str | ModelArgs | None = None,
                  hf_assets_path: str | Path | None = None, export_dtype: str = "float32",
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True) -> Path:
    """Convert a DCP step folder into a complete HF ``LlamaForCausalLM`` folder ``out_dir``.

    Args:
        in_dir: a ``step-N`` folder: full training or model-only, any world size, chunks and tiles.
        flavor: a ``LLAMA3_FLAVORS`` name or ``ModelArgs``; None: the one the step's manifest
            records (``8B`` without a manifest). A name must match the recorded one.
        hf_assets_path: a folder whose tokenizer and generation files are copied (and whose
            ``config.json``, if any, gives the bos/eos token ids); regular files only, never
            through a symlink. Without one the export has no tokenizer (a warning).
        export_dtype: ``float32`` (default), ``bfloat16`` or ``float16``.
        max_shard_bytes: the most bytes per safetensors shard.
        progress: show progress on stderr.

    Returns:
        ``out_dir`` (absolute).

    Raises:
        CheckpointError: the input is not a DCP checkpoint of this flavor (naming the first bad
            tensor), ``flavor`` differs from the recorded one, the assets folder is missing or holds a
            symlink, or ``out_dir`` exists and is not empty.
        ConfigError: an unknown flavor or dtype.
    """
    name, args = resolve_flavor(step_flavor(in_dir, flavor))
    dtype = _dtype(export_dtype, "--export_dtype")
    adapter = Llama3HFAdapter(args, name)
    check_output(out_dir)
    src = ObjectPath(in_dir) if is_url(in_dir) else Path(os.path.abspath(in_dir))
    # Reads .metadata once for the many one-tensor loads, and checks every byte against the manifest
    # (on an object store, each tensor's byte ranges only).
    reader = VerifyingReader.for_step(src) if isinstance(src, ObjectPath) or src.is_dir() else VerifyingReader(src)
    saved = _read_dcp_metadata(src, reader)
    check_dcp_keys(adapter, saved, str(src))
    assets = None if hf_assets_path is None else Path(hf_assets_path)
    bos, eos = check_export_assets(assets, "--hf_assets_path")  # warns when the export gets no tokenizer

    stored = {key: saved[key].properties.dtype for key in adapter.shapes}
    plan = [(to_hf_key(key), shape, _target_dtype(stored[key], dtype)) for key, shape in adapter.shapes.items()]
    bar = Progress(f"{src} -> HF", len(plan), sum(nbytes_of(s, d) for _, s, d in plan), enabled=progress)
    with staged_output(out_dir) as partial:
        writer = StreamingHFWriter(partial, plan, max_shard_bytes)
        try:
            for (hf_key, shape, target), key in zip(plan, adapter.shapes, strict=True):
                out = adapter.to_hf(key, _load_one(reader, key, shape, target, src))[1]
                writer.add(hf_key, out)
                bar.update(out.nbytes)
                del out
                release_memory()
            writer.finish(hf_config(args, dtype, bos_token_id=bos, eos_token_id=eos), assets, "--hf_assets_path")
        finally:
            writer.close()
    bar.close()
    return Path(os.path.abspath(out_dir))
