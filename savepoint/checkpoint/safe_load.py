"""Loading a checkpoint without running code from it.

DCP unpickles ``.metadata`` with the stock unpickler and reads non-tensor values with
``torch.load(weights_only=False)``: a crafted checkpoint runs code on load. Here ``.metadata`` goes
through :class:`RestrictedUnpickler`, and non-tensor values through ``torch.load(weights_only=True)``
(:class:`SafeLoadPlanner`).

:class:`RestrictedUnpickler` is Python's own pure-Python unpickler with the opcodes that could do
harm narrowed down:

- names (``GLOBAL``, ``STACK_GLOBAL``, ``INST``) resolve only to the classes DCP metadata is made of;
- calls (``REDUCE``, ``NEWOBJ``, ``OBJ``, ``INST``) go only to those classes;
- state (``BUILD``) is set only on a metadata object this load created, once, and never on a class,
  a function or a shared object, so a step cannot change how the next one loads; items are added
  only to the dicts, lists and sets this load built;
- its memo is a dict, one entry per memo opcode, so memory grows with the file, not with the
  indices a file names (the C unpickler allocates a table up to the largest index it sees);
- nothing is allocated before the bytes for it are read (``BYTEARRAY8`` is refused), and the input
  is at most ``MAX_METADATA_BYTES``.

The price is speed: it runs as fast as Python's pure-Python unpickler, about 1 s per MB of
``.metadata`` on a busy 2-core machine, 3-15x the C unpickler's time (the debug model's 0.24 MB
takes 0.25 s; a 20,000-chunk, 3 MB one about 4 s). A reader unpickles ``.metadata`` once per load.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import re
import threading
from collections import OrderedDict
from typing import IO, Any

import torch
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from savepoint.errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError

# A DCP .metadata is ~200 bytes per stored chunk: 1 GiB is millions of chunks, far past any real job.
MAX_METADATA_BYTES = 1 << 30

_DCP_CLASSES = ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                "TensorProperties", "MetadataIndex", "StorageMeta")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    import pathlib

    from torch.distributed.checkpoint import filesystem, metadata

    allowed: dict[tuple[str, str], Any] = {}
    for name in (*_DCP_CLASSES, "_MEM_FORMAT_ENCODING"):
        if hasattr(metadata, name):
            allowed[(metadata.__name__, name)] = getattr(metadata, name)
    allowed[(filesystem.__name__, "_StorageInfo")] = filesystem._StorageInfo
    # StorageMeta.checkpoint_id is the path the step was written to; layouts pickle as a lookup by name.
    for name in ("PosixPath", "PurePosixPath"):
        allowed[("pathlib", name)] = getattr(pathlib, name)
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch", "device")] = torch.device
    allowed[("collections", "OrderedDict")] = OrderedDict
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            allowed[("torch", name)] = value
    return allowed


class _Tables:
    """What a restricted load may name, call and set state on (built once, on first use)."""

    def __init__(self) -> None:
        from torch.distributed.checkpoint import filesystem, metadata

        self.by_name = _allowed_globals()
        values = list(self.by_name.values())
        self.callables = {id(v): v for v in values if callable(v)}  # dtypes and layouts are not
        self.classes = {id(v): v for v in values if isinstance(v, type)}
        # The dataclasses whose instances DCP pickles with a state to BUILD.
        self.buildable = {getattr(metadata, n) for n in _DCP_CLASSES if hasattr(metadata, n)}
        self.buildable.add(filesystem._StorageInfo)
        assert all(dataclasses.is_dataclass(c) for c in self.buildable)


_TABLES: _Tables | None = None
_TABLES_LOCK = threading.Lock()


def _tables() -> _Tables:
    global _TABLES
    with _TABLES_LOCK:
        if _TABLES is None:
            _TABLES = _Tables()
        return _TABLES


def _what(obj: Any) -> str:
    if isinstance(obj, type):
        return f"the class {obj.__module__}.{obj.__qualname__}"
    if callable(obj):
        return f"the function {getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"
    return f"a {type(obj).__module__}.{type(obj).__qualname__} object"


class RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """Builds DCP metadata and nothing else: see the module docstring for what each opcode may do.

    Args:
        file: the pickle.
        source: the file's path, for messages.
    """

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, file: IO[bytes], source: str):
        super().__init__(file)
        self.source = source
        self.tables = _tables()
        # Metadata objects created by this load and not yet given their state: id -> object (the
        # object is held so that its id cannot be reused by another one during the load).
        self._unbuilt: dict[int, Any] = {}

    # ---- refusals ---------------------------------------------------------------------------

    def _refuse(self, what: str) -> UnsafeCheckpointError:
        return UnsafeCheckpointError(
            f"{self.source} asks to {what}, which DCP metadata never does: the file is corrupt or was crafted "
            "to run code or change the program when loaded, so it was not loaded. Nothing was executed")

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.tables.by_name[(module, name)]
        except (KeyError, TypeError):
            named = f"{module}.{name}"  # a crafted name may hold newlines or terminal escapes: one line, inert
            raise self._refuse(f"load {named if named.isprintable() else ascii(named)}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise self._refuse("follow a persistent reference")

    def _refuse_opcode(self, name: str) -> None:
        raise self._refuse(f"use the pickle opcode {name}")

    for _op in ("BYTEARRAY8", "NEXT_BUFFER", "READONLY_BUFFER", "EXT1", "EXT2", "EXT4"):
        dispatch[getattr(pickle, _op)[0]] = (lambda name: lambda self: self._refuse_opcode(name))(_op)
    del _op

    # ---- calls: only the allowed classes, and what they create ----------------------------------

    def _checked_call(self, func: Any, args: Any, kwargs: Any = None, new: bool = False) -> Any:
        table = self.tables.classes if new else self.tables.callables
        if table.get(id(func)) is not func:
            raise self._refuse(f"call {_what(func)}")
        if not isinstance(args, tuple) or not (kwargs is None or type(kwargs) is dict):
            raise CorruptCheckpointError(f"{self.source} is corrupt: a call's arguments are not a tuple")
        obj = func.__new__(func, *args, **(kwargs or {})) if new else func(*args, **(kwargs or {}))
        if type(obj) in self.tables.buildable:
            self._unbuilt[id(obj)] = obj
        return obj

    def load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self._checked_call(self.stack[-1], args)

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._checked_call(cls, args, new=True))

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._checked_call(cls, args, kwargs, new=True))

    def _instantiate(self, klass: Any, args: list) -> None:  # INST and OBJ
        if self.tables.classes.get(id(klass)) is not klass:
            raise self._refuse(f"call {_what(klass)}")
        self.append(self._checked_call(klass, tuple(args)))

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    # ---- state: only on metadata objects this load created, once -----------------------------------

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if self._unbuilt.pop(id(inst), None) is not inst:
            raise self._refuse(f"set the state of {_what(inst)}")
        if getattr(type(inst), "__setstate__", None) is not None:  # TensorProperties: its own code, checked
            inst.__setstate__(state)
            return
        if type(state) is not dict or any(type(k) is not str or k.startswith("__") for k in state):
            raise self._refuse(f"set attributes of a {type(inst).__name__} other than its fields")
        inst.__dict__.update(state)

    def _container(self, kinds: tuple[type, ...], what: str) -> Any:
        target = self.stack[-1] if self.stack else None
        if type(target) not in kinds:
            raise self._refuse(f"{what} {_what(target)}")
        return target

    def load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._container((dict, OrderedDict), "add an item to")[key] = value

    def load_setitems(self) -> None:
        items = self.pop_mark()
        target = self._container((dict, OrderedDict), "add items to")
        for i in range(0, len(items) - 1, 2):
            target[items[i]] = items[i + 1]

    def load_append(self) -> None:
        value = self.stack.pop()
        self._container((list,), "append to").append(value)

    def load_appends(self) -> None:
        items = self.pop_mark()
        self._container((list,), "append to").extend(items)

    def load_additems(self) -> None:
        items = self.pop_mark()
        self._container((set,), "add to").update(items)

    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.APPEND[0]] = load_append
    dispatch[pickle.APPENDS[0]] = load_appends
    dispatch[pickle.ADDITEMS[0]] = load_additems


def safe_unpickle(data: bytes, source: str) -> Any:
    """Unpickle DCP metadata without running code from it or changing anything outside the result.

    Raises:
        UnsafeCheckpointError: the pickle names a forbidden object or asks for a forbidden change.
        CorruptCheckpointError: the bytes are not a valid pickle, or are more than ``MAX_METADATA_BYTES``.
    """
    if len(data) > MAX_METADATA_BYTES:
        raise CorruptCheckpointError(f"{source} is {len(data):,} bytes, more than the {MAX_METADATA_BYTES:,} "
                                     "DCP metadata can be: it is damaged or not DCP metadata")
    try:
        return RestrictedUnpickler(io.BytesIO(data), source).load()
    except CheckpointError:
        raise
    except Exception as e:  # a damaged pickle fails in many ways
        raise CorruptCheckpointError(f"{source} is corrupt: cannot unpickle it ({type(e).__name__}: "
                                     f"{_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def stored_value_error(e: Exception, fqn: str, file: str | None = None) -> CheckpointError:
    """One line for a stored item ``torch.load(weights_only=True)`` could not load.

    Returns:
        UnsafeCheckpointError when the item's pickle asks for an object outside plain data (torch
        names it as ``GLOBAL module.name``), CorruptCheckpointError otherwise.
    """
    where = f"checkpoint value {fqn!r}" + (f" in {file}" if file else "")
    if isinstance(e, pickle.UnpicklingError):
        named = re.search(r"GLOBAL ([\w.]+)", str(e))
        if named:
            return UnsafeCheckpointError(f"{where} holds an object outside plain data (it asks to load "
                                         f"{named.group(1)}); refused without running it. Nothing was executed")
        return UnsafeCheckpointError(f"{where} holds an object outside plain data ({_first_line(e)}); refused "
                                     "without running it. Nothing was executed")
    return CorruptCheckpointError(f"{where} is corrupt: {type(e).__name__}: {_first_line(e)}")


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner with non-tensor values read by ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as e:
            raise stored_value_error(e, read_item.dest_index.fqn) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
