"""Loading a checkpoint without running code from it.

DCP unpickles ``.metadata`` with the stock unpickler and reads non-tensor values with
``torch.load(weights_only=False)``: a crafted checkpoint runs code on load. Here ``.metadata`` goes
through :class:`RestrictedUnpickler`, which builds only the classes DCP metadata is made of, and
non-tensor values through ``torch.load(weights_only=True)`` (:class:`SafeLoadPlanner`).
"""

from __future__ import annotations

import io
import pickle
import re
import threading
from typing import IO, Any

import torch
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from savepoint.errors import CorruptCheckpointError, UnsafeCheckpointError


def _allowed_globals() -> dict[tuple[str, str], Any]:
    import collections

    from torch.distributed.checkpoint import filesystem, metadata

    allowed: dict[tuple[str, str], Any] = {}
    import pathlib

    for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                 "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"):
        if hasattr(metadata, name):
            allowed[(metadata.__name__, name)] = getattr(metadata, name)
    allowed[(filesystem.__name__, "_StorageInfo")] = filesystem._StorageInfo
    # StorageMeta.checkpoint_id is the path the step was written to; layouts pickle as a lookup by name.
    for name in ("PosixPath", "PurePosixPath"):
        allowed[("pathlib", name)] = getattr(pathlib, name)
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch", "device")] = torch.device
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            allowed[("torch", name)] = value
    return allowed


_ALLOWED: dict[tuple[str, str], Any] | None = None
_ALLOWED_LOCK = threading.Lock()


class RestrictedUnpickler(pickle.Unpickler):
    """Builds DCP metadata and nothing else: any other global is refused, so no code can run."""

    def __init__(self, file: IO[bytes], source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        global _ALLOWED
        with _ALLOWED_LOCK:
            if _ALLOWED is None:
                _ALLOWED = _allowed_globals()
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"{self.source} asks to load {module}.{name}, which DCP metadata never contains: the file is "
                "corrupt or was crafted to run code when loaded, so it was not loaded. Nothing was executed"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(f"{self.source} holds a persistent reference, which DCP metadata never does")


def safe_unpickle(data: bytes, source: str) -> Any:
    """Unpickle DCP metadata without running code from it.

    Raises:
        UnsafeCheckpointError: the pickle names a forbidden object.
        CorruptCheckpointError: the bytes are not a valid pickle.
    """
    try:
        return RestrictedUnpickler(io.BytesIO(data), source).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # a damaged pickle fails in many ways
        raise CorruptCheckpointError(f"{source} is corrupt: cannot unpickle it ({type(e).__name__}: {e})") from None


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner with non-tensor values read by ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            named = re.search(r"GLOBAL ([\w.]+)", str(e))
            what = f"it asks to load {named.group(1)}" if named else str(e).splitlines()[0]
            raise UnsafeCheckpointError(
                f"checkpoint value {read_item.dest_index.fqn!r} holds an object outside plain data ({what}); "
                "refused without running it. Nothing was executed"
            ) from None
        except Exception as e:
            raise CorruptCheckpointError(
                f"checkpoint value {read_item.dest_index.fqn!r} is corrupt: {type(e).__name__}: {e}"
            ) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
