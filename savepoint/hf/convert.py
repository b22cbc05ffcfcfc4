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
come through ``run``/``main`` here.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import SerializationFormat
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.planner import WriteItem, WriteItemType

from savepoint.checkpoint.manifest import read_manifest
from savepoint.checkpoint.reader import VerifyingReader
from savepoint.checkpoint.safe_load import SafeLoadPlanner
from savepoint.durable import DCP_MARKER, HF_INDEX, publish
from savepoint.errors import CheckpointError, ConfigError, SavepointError
from savepoint.hf.folder import (
    DEFAULT_SHARD_BYTES,
    SINGLE,
    SafetensorsReader,
    StreamingHFWriter,
    check_export_assets,
    nbytes_of,
)
from savepoint.hf.llama3 import Llama3HFAdapter, hf_config, to_hf_key
from savepoint.models.llama3.args import LLAMA3_FLAVORS, ModelArgs

logger = logging.getLogger(__name__)

MODEL_NAMES = ("llama3",)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_FLAVOR = "8B"  # TorchTitan's scripts' default, for steps that record none
KEEP = "keep"  # --dtype keep: each tensor in the dtype the HF folder stores it in
_DIST_WARNING = "torch.distributed is disabled"


def resolve_flavor(flavor: str | ModelArgs) -> tuple[str, ModelArgs]:
    """(name, args) for a flavor name or a ``ModelArgs`` (named ``custom``).

    Raises:
        ConfigError: an unknown flavor name.
    """
    if isinstance(flavor, ModelArgs):
        return "custom", flavor
    if flavor not in LLAMA3_FLAVORS:
        raise ConfigError([f"--model_flavor {flavor!r} is not a Llama 3 flavor; choose from "
                           f"{', '.join(LLAMA3_FLAVORS)}"])
    return flavor, LLAMA3_FLAVORS[flavor]


def _dtype(name: str, option: str, keep_ok: bool = False) -> torch.dtype | None:
    if keep_ok and name == KEEP:
        return None
    if name not in DTYPES:
        choices = [*DTYPES, KEEP] if keep_ok else list(DTYPES)
        raise ConfigError([f"{option} {name!r} is not supported; choose from {', '.join(choices)}"])
    return DTYPES[name]


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``tensor`` in ``dtype``; None, and integer or bool tensors, keep their dtype."""
    if dtype is None or tensor.dtype == dtype or not tensor.is_floating_point():
        return tensor
    return tensor.to(dtype)


def _target_dtype(stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    return stored if dtype is None or not stored.is_floating_point else dtype


class Progress:
    """One updating line on stderr (tensors done / total, MB, MB/s); on a non-terminal, only the final line."""

    def __init__(self, label: str, total_items: int, total_bytes: int, enabled: bool = True,
                 stream: IO[str] | None = None, interval: float = 0.1):
        self.label, self.total_items, self.total_bytes = label, total_items, total_bytes
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.live = enabled and getattr(self.stream, "isatty", lambda: False)()
        self.interval = interval
        self.items = self.bytes = 0
        self.start = self.last = time.perf_counter()
        self.width = 0

    def line(self) -> str:
        seconds = max(time.perf_counter() - self.start, 1e-9)
        mb, total_mb = self.bytes / 1e6, self.total_bytes / 1e6
        digits = 0 if total_mb >= 100 else 1
        return (f"{self.label}: {self.items}/{self.total_items} tensors, {mb:,.{digits}f}/{total_mb:,.{digits}f} MB, "
                f"{mb / seconds:,.0f} MB/s, {seconds:.1f} s")

    def update(self, nbytes: int) -> None:
        self.items += 1
        self.bytes += nbytes
        now = time.perf_counter()
        if self.live and (now - self.last >= self.interval or self.items == self.total_items):
            self.last = now
            self._show(end="")

    def _show(self, end: str) -> None:
        text = self.line()
        pad = " " * max(self.width - len(text), 0)
        self.width = len(text)
        self.stream.write(("\r" if self.live else "") + text + pad + end)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._show(end="\n")


def partial_path(out_dir: str | Path) -> Path:
    """The hidden sibling a conversion into ``out_dir`` writes to before it renames it."""
    out = Path(os.path.abspath(out_dir))
    return out.parent / f".{out.name}.partial"


def check_output(out_dir: str | Path) -> Path:
    """``out_dir`` as an absolute path, if a conversion may create it.

    Raises:
        CheckpointError: it is a file or a non-empty folder (left untouched).
    """
    out = Path(os.path.abspath(out_dir))
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise CheckpointError(f"output {out} exists and is not a folder; nothing was written. "
                                  "Choose a new output folder")
        if any(out.iterdir()):
            raise CheckpointError(f"output folder {out} already exists and is not empty; nothing was written "
                                  "and it was left untouched. Choose a new output folder or remove it first")
    return out


@contextmanager
def staged_output(out_dir: str | Path) -> Iterator[Path]:
    """Yield an empty hidden ``.<name>.partial`` folder; rename it to ``out_dir`` if the body succeeds.

    On any failure (or interrupt) the partial folder is removed and ``out_dir`` is not created.

    Raises:
        CheckpointError: ``out_dir`` is a file or a non-empty folder, or cannot be created.
    """
    out = check_output(out_dir)
    partial = partial_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if partial.exists():
            shutil.rmtree(partial)  # left by an interrupted conversion into the same folder
        partial.mkdir()
    except OSError as e:
        raise CheckpointError(f"cannot create {partial} next to the output folder: {e.strerror or e}") from e
    try:
        yield partial
        try:
            publish(partial, out)  # takes the place of an empty folder, never of one with files
        except FileExistsError:
            raise CheckpointError(f"output folder {out} got files from elsewhere during the conversion; nothing "
                                  "was written there and it was left as it was. Choose a new output folder") from None
        except OSError as e:
            raise CheckpointError(f"cannot rename {partial} to {out}: {e.strerror or e}; {out} was left as "
                                  "it was") from e
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


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


def _unwrap(error: BaseException, what: str) -> SavepointError:
    """A one-line SavepointError for an error raised inside DCP (which wraps errors in CheckpointException)."""
    inner = error
    if isinstance(error, CheckpointException) and error.failures:
        inner = next(iter(error.failures.values()))
        inner = inner[0] if isinstance(inner, tuple) else inner
    if isinstance(inner, SavepointError):
        return inner
    return CheckpointError(f"{what} failed: {type(inner).__name__}: {inner}")


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
            raise _unwrap(e, f"writing the DCP checkpoint into {partial}") from e
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
    for key in sorted(saved):
        if _is_model_key(key) and key not in adapter.shapes:
            raise CheckpointError(f"{where}: tensor {key!r} has no place in a Llama 3 {adapter.flavor} model "
                                  f"({adapter.args.n_layers} layers); check --model_flavor")
    for key, shape in adapter.shapes.items():
        entry = saved.get(key)
        if entry is None:
            raise CheckpointError(f"{where}: model tensor {key!r} is missing; the checkpoint is not a Llama 3 "
                                  f"{adapter.flavor} model (or is a TorchTitan 0.3 layout)")
        if not isinstance(entry, TensorStorageMetadata):
            raise CheckpointError(f"{where}: {key!r} is not a tensor in the checkpoint")
        if tuple(entry.size) != shape:
            raise CheckpointError(f"{where}: tensor {key!r} has shape {list(entry.size)} but the Llama 3 "
                                  f"{adapter.flavor} model needs {list(shape)}; check --model_flavor")


def _read_dcp_metadata(src: Path, reader: VerifyingReader) -> dict[str, Any]:
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


def recorded_flavor(step_dir: Path) -> str | None:
    """The ``--model.flavor`` a step's manifest records; None without a manifest (TorchTitan) or flavor.

    Raises:
        CorruptCheckpointError: the manifest is damaged.
    """
    manifest = read_manifest(step_dir) if step_dir.is_dir() else None
    try:
        recorded = manifest["job_config"]["model"]["flavor"]  # type: ignore[index]
    except (KeyError, TypeError):
        return None
    return recorded if isinstance(recorded, str) else None


def step_flavor(step_dir: str | Path, flavor: str | ModelArgs | None) -> str | ModelArgs:
    """The flavor to convert ``step_dir`` with: ``flavor``, checked against the one its manifest records.

    Without ``flavor``, the recorded one; with neither (a step written by TorchTitan has no
    manifest), ``8B``, TorchTitan's default. A ``ModelArgs`` is taken as it is.

    Raises:
        CheckpointError: ``flavor`` differs from the recorded one, or the recorded one is unknown here,
            or the manifest is corrupt.
    """
    if isinstance(flavor, ModelArgs):
        return flavor
    step_dir = Path(step_dir)
    recorded = recorded_flavor(step_dir)
    if recorded is None:
        return flavor or DEFAULT_FLAVOR
    if flavor is None:
        if recorded not in LLAMA3_FLAVORS:
            raise CheckpointError(f"{step_dir}/manifest.json records the flavor {recorded!r}, which is not a "
                                  f"Llama 3 flavor here ({', '.join(LLAMA3_FLAVORS)}); pass --model_flavor")
        return recorded
    if flavor != recorded:
        raise CheckpointError(f"--model_flavor {flavor} does not match {step_dir}, which was trained with flavor "
                              f"{recorded} (its manifest.json records it); drop --model_flavor to use {recorded}, or "
                              f"point at a step trained with {flavor}")
    return flavor


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
    src = Path(os.path.abspath(in_dir))
    # Reads .metadata once for the many one-tensor loads, and checks every byte against the manifest.
    reader = VerifyingReader.for_step(src) if src.is_dir() else VerifyingReader(src)
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
                # DCP copies what it reads into this tensor, casting as Tensor.to would: no second copy to cast.
                tensor = torch.empty(shape, dtype=target)
                try:
                    with _quiet_dcp():
                        dcp.load({key: tensor}, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=True)
                except (Exception, CheckpointException) as e:
                    raise _unwrap(e, f"reading {key!r} from {src}") from e
                out = adapter.to_hf(key, tensor)[1]
                del tensor
                writer.add(hf_key, out)
                bar.update(out.nbytes)
                del out
                release_memory()
            writer.finish(hf_config(args, dtype, bos_token_id=bos, eos_token_id=eos), assets, "--hf_assets_path")
        finally:
            writer.close()
    bar.close()
    return Path(os.path.abspath(out_dir))


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
        parser.add_argument("--dtype", default="float32", choices=[*DTYPES, KEEP],
                            help="dtype of the DCP tensors (default float32, for training; keep: as stored in HF)")
    else:
        parser.add_argument("--export_dtype", default="float32", choices=list(DTYPES))
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
    try:
        if direction == "from_hf":
            out = convert_from_hf(ns.input_dir, ns.output_dir, ns.model_flavor, dtype=ns.dtype)
        else:
            flavor = step_flavor(ns.input_dir, ns.model_flavor)
            if ns.model_flavor is None:
                how = "as its manifest.json records" if recorded_flavor(Path(ns.input_dir)) else \
                    "the default: the step has no manifest.json recording one"
                print(f"converting {ns.input_dir} as Llama 3 {flavor} ({how}; --model_flavor overrides)")
            out = convert_to_hf(ns.input_dir, ns.output_dir, flavor, hf_assets_path=ns.hf_assets_path,
                                export_dtype=ns.export_dtype, max_shard_bytes=ns.max_shard_size)
    except CheckpointError as e:
        # The adapter's messages name the training flag; here the flag is --model_flavor.
        raise CheckpointError(str(e).replace("--model.flavor", "--model_flavor")) from e
    print(f"wrote {out}")
    return out


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
