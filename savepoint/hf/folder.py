"""Hugging Face model folders: read safetensors one tensor at a time, write them shard by shard.

A folder holds ``model.safetensors`` or ``model-0000i-of-0000N.safetensors`` shards with a
``model.safetensors.index.json`` weight map, plus ``config.json`` and tokenizer files. Reading opens
each file's header only; a tensor's bytes are read when asked for. Writing keeps at most one shard
of tensors in memory.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import IO, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from savepoint.durable import HF_INDEX, fsync_file, write_json
from savepoint.errors import CheckpointError
from savepoint.hf.assets import copy_assets, generation_config
from savepoint.hf.files import CONFIG_LIMIT, INDEX_LIMIT, hf_file, parse_json, read_json
from savepoint.safe_io import open_regular, regular_size

SINGLE = "model.safetensors"
DEFAULT_SHARD_BYTES = 5 * 1024**3
HEADER_LIMIT = 100_000_000  # safetensors itself caps headers at 100 MB
# safetensors' own dtype names (F32, BF16, ...: a format table, not the names users give) <-> torch dtypes.
ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
ST_NAMES = {dtype: name for name, dtype in ST_DTYPES.items()}


class HFFolder:
    """The tensors of an HF safetensors folder, by HF key, read lazily.

    The folder is untrusted: every file it names must be a regular file inside it (no absolute
    names, ``..`` or symlinks, which could point at any file on the machine; no FIFO, which would
    block forever), and the JSON files and safetensors headers are read within a size bound and
    checked field by field, so a damaged folder gives one error naming the file instead of a
    traceback or an endless wait.

    Raises:
        CheckpointError: the path is not a folder, holds no safetensors, an index names a missing
            or outside file, or a file's header is corrupt (each names the file).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path} is not a folder; point at a Hugging Face model folder "
                                  f"(holding {SINGLE} or {HF_INDEX})")
        self.entries: dict[str, tuple[Path, tuple[int, ...], str]] = {}  # key -> (file, shape, dtype)
        self._layout: dict[Path, tuple[int, dict[str, Any]]] = {}  # file -> (data start, header)
        for file in self._files():
            start, header = self._header(file)
            for key, info in header.items():
                if key in self.entries:
                    raise CheckpointError(f"{self.path}: tensor {key!r} is stored twice, in "
                                          f"{self.entries[key][0].name} and {file.name}; re-download or re-export it")
                self.entries[key] = (file, tuple(info["shape"]), info["dtype"])
        self._open: dict[Path, object] = {}

    def _files(self) -> list[Path]:
        index = self.path / HF_INDEX
        if os.path.lexists(index):
            weight_map = read_json(index, INDEX_LIMIT, "safetensors index").get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index} is not a valid safetensors index: it needs a \"weight_map\" object "
                                      "from tensor names to file names; re-download or re-export it")
            files = sorted({hf_file(self.path, name, f"file named by {HF_INDEX}") for name in weight_map.values()})
            missing = [f.name for f in files if not os.path.lexists(f)]
            if missing:
                raise CheckpointError(f"{index} names files that are not in {self.path}: {missing[:3]}")
            return files
        files = [hf_file(self.path, p.name, "weight file") for p in sorted(self.path.glob("*.safetensors"))]
        if not files:
            raise CheckpointError(f"{self.path} holds no *.safetensors files: it is not a Hugging Face model folder")
        return files

    def _header(self, file: Path) -> tuple[int, dict[str, Any]]:
        """(data start, {key: {dtype, shape, data_offsets}}) of a safetensors file, checked against its size."""
        if file in self._layout:
            return self._layout[file]
        bad = f"{file} is not a readable safetensors file"
        try:
            with open_regular(file, "safetensors file") as f:
                size = os.fstat(f.fileno()).st_size
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise CheckpointError(f"{bad} ({size} bytes, shorter than its header); re-download or re-export it")
                (length,) = struct.unpack("<Q", prefix)
                if length > min(HEADER_LIMIT, size - 8):
                    raise CheckpointError(f"{bad} (its header claims {length:,} bytes, the file has {size:,}); "
                                          "re-download or re-export it")
                header = parse_json(f.read(length), file, "safetensors file")
        except FileNotFoundError:
            raise CheckpointError(f"{file} is missing; re-download or re-export the folder") from None
        header.pop("__metadata__", None)
        data = size - 8 - length
        for key, info in header.items():
            problem = _entry_problem(info, data)
            if problem:
                raise CheckpointError(f"{bad}: tensor {key!r} {problem}; re-download or re-export it")
        self._layout[file] = (8 + length, header)
        return self._layout[file]

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][1]

    def dtype(self, key: str) -> torch.dtype:
        file, _, name = self.entries[key]
        if name not in ST_DTYPES:
            raise CheckpointError(f"{file}: tensor {key!r} has dtype {name}, which savepoint cannot convert")
        return ST_DTYPES[name]

    def read(self, key: str) -> torch.Tensor:
        """The tensor ``key``, read from disk now (through the safetensors mmap)."""
        file = self.entries[key][0]
        if file not in self._open:
            regular_size(file, "safetensors file")  # no symlink or FIFO swapped in since the header was read
            self._open[file] = safe_open(str(file), framework="pt")
        return self._open[file].get_tensor(key)  # type: ignore[attr-defined]

    def config(self) -> dict:
        """``config.json`` as a dict ({} when there is none).

        Raises:
            CheckpointError: it is not a regular file, too big, not JSON or not a JSON object.
        """
        path = self.path / "config.json"
        return read_json(path, CONFIG_LIMIT, "model config") if os.path.lexists(path) else {}

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in {file for file, _, _ in self.entries.values()})


def _entry_problem(info: Any, data_bytes: int) -> str | None:
    """Why a safetensors header entry is malformed, or None."""
    if not isinstance(info, dict):
        return "has no {dtype, shape, data_offsets} entry"
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(info.get("dtype"), str):
        return "has no dtype name"
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        return f"has shape {shape!r}, not a list of sizes"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_bytes):
        return f"has data_offsets {offsets!r}, outside the file's {data_bytes:,} data bytes"
    return None


class HFWriter:
    """Writes tensors into ``model-0000i-of-0000N.safetensors`` shards of at most ``max_shard_bytes``.

    ``add`` tensors in order, then ``finish``. Shards are written under temporary names and get
    their final ``-of-N`` names once N is known. Every file is fsynced.
    """

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self.pending[key] = tensor.detach().cpu().contiguous()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        path = self.out_dir / f".shard-{len(self.shards) + 1:05d}.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        fsync_file(path)
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self, config: dict, assets: str | Path | None = None,
               assets_flag: str = "--model.hf_assets_path") -> list[Path]:
        """Name the shards, write the index and ``config.json``, copy tokenizer files; returns the shards.

        An export whose config has token ids and whose assets hold no ``generation_config.json`` gets one.
        """
        if self.pending or not self.shards:
            self._flush()
        count = len(self.shards)
        weight_map, names = {}, []
        for i, (tmp, keys) in enumerate(self.shards, start=1):
            name = SINGLE if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors"
            os.replace(tmp, self.out_dir / name)
            names.append(self.out_dir / name)
            weight_map.update(dict.fromkeys(keys, name))
        write_json(self.out_dir / HF_INDEX, {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map})
        write_json(self.out_dir / "config.json", config)
        if assets is not None:
            copy_assets(Path(assets), self.out_dir, assets_flag)
        generation = generation_config(config.get("bos_token_id"), config.get("eos_token_id"))
        if generation is not None and not os.path.lexists(self.out_dir / "generation_config.json"):
            write_json(self.out_dir / "generation_config.json", generation)
        return names


def nbytes_of(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


class SafetensorsReader(HFFolder):
    """``HFFolder`` that reads a tensor's bytes with plain file reads into fresh (freeable) memory.

    ``HFFolder.read`` goes through the safetensors mmap, which keeps every page it touched resident
    while the file stays open: converting a 5 GB shard would hold 5 GB of RSS.
    """

    def read(self, key: str) -> torch.Tensor:
        file, shape, _ = self.entries[key]
        start, header = self._header(file)
        begin, end = header[key]["data_offsets"]
        dtype = self.dtype(key)
        if end - begin != nbytes_of(shape, dtype):
            raise CheckpointError(f"{file}: tensor {key!r} has {end - begin} bytes for shape {list(shape)}; "
                                  "the file is corrupt")
        out = torch.empty(end - begin, dtype=torch.uint8)
        view = memoryview(out.numpy())
        with open_regular(file, "safetensors file") as f:
            f.seek(start + begin)
            done = 0
            while done < len(view):
                got = f.readinto(view[done:])
                if not got:
                    raise CheckpointError(f"{file} is truncated: tensor {key!r} ends past the end of the file; "
                                          "re-download or re-export it")
                done += got
        return out.view(dtype).reshape(shape)


class StreamingHFWriter(HFWriter):
    """``HFWriter`` that writes each tensor's bytes as it is added, given all keys, shapes and dtypes up front.

    Shards are cut exactly as ``HFWriter`` cuts them (a new shard when the next tensor would pass
    ``max_shard_bytes``); each shard's safetensors header is written when it opens, so memory holds
    no more than the tensor being added. Tensors must be added in ``plan`` order.
    """

    def __init__(self, out_dir: str | Path, plan: list[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        super().__init__(out_dir, max_shard_bytes)
        self.groups: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = []
        size = 0
        for key, shape, dtype in plan:
            nbytes = nbytes_of(shape, dtype)
            if not self.groups or (self.groups[-1] and size + nbytes > max_shard_bytes):
                self.groups.append([])
                size = 0
            self.groups[-1].append((key, tuple(shape), dtype))
            size += nbytes
        self._file: IO[bytes] | None = None
        self._pos = 0  # next tensor within the open shard

    def add(self, key: str, tensor: torch.Tensor) -> None:
        group = self.groups[len(self.shards)]
        want = group[self._pos]
        got = (key, tuple(tensor.shape), tensor.dtype)
        if got != want:
            raise RuntimeError(f"StreamingHFWriter: expected {want}, got {got}")
        if self._pos == 0:
            self._open(group)
        assert self._file is not None
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._pos += 1
        self.total_bytes += data.numel()
        if self._pos == len(group):
            self._close(group)

    def _path(self) -> Path:
        return self.out_dir / f".shard-{len(self.shards) + 1:05d}.tmp"  # HFWriter's names: finish() renames them

    def _open(self, group: list[tuple[str, tuple[int, ...], torch.dtype]]) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for key, shape, dtype in group:
            nbytes = nbytes_of(shape, dtype)
            header[key] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # safetensors aligns the data to 8 bytes
        self._file = open(self._path(), "wb")  # noqa: SIM115 (closed in _close or close)
        self._file.write(struct.pack("<Q", len(blob)) + blob)

    def _close(self, group: list[tuple[str, tuple[int, ...], torch.dtype]]) -> None:
        assert self._file is not None
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        self.shards.append((self._path(), [key for key, _, _ in group]))
        self._pos = 0

    def finish(self, config: dict, assets: str | Path | None = None,
               assets_flag: str = "--model.hf_assets_path") -> list[Path]:
        if len(self.shards) != len(self.groups) or not self.shards:
            raise RuntimeError(f"StreamingHFWriter: {len(self.shards)} of {len(self.groups)} shards written")
        return super().finish(config, assets, assets_flag)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


