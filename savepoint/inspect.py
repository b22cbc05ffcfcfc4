"""``savepoint inspect``: what a checkpoint folder or one step holds, without loading tensors.

Everything shown comes from files a crafted checkpoint controls, so each is read through the checked
readers (``manifest.read_manifest`` for ``manifest.json``, :class:`VerifyingReader` for
``.metadata``, which never runs code from it), and every value is checked for its type before use.
A step that cannot be read is listed as such and makes the command fail; the others are still shown.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from savepoint.checkpoint.objstore import ObjectPath, is_url
from savepoint.checkpoint.states import EXCLUDABLE
from savepoint.checkpoint.storage import STEP_DIR_RE, CheckpointFolder, folder_bytes
from savepoint.durable import DCP_MARKER, HF_INDEX, MANIFEST
from savepoint.errors import CheckpointError, CorruptCheckpointError


def describe(path: str | os.PathLike) -> tuple[str, list[str]]:
    """A summary of a checkpoint folder (its committed steps) or of one step folder.

    Returns:
        (the summary, the names of the steps in a folder that could not be read: each is listed
        in the summary with why).

    Raises:
        CheckpointError: the path is neither a folder nor a step, or (for one step) it cannot be read.
    """
    if is_url(path):
        return _describe_objects(ObjectPath(path))
    target = Path(path)
    if CheckpointFolder.is_committed(target):
        return "\n".join(_step_lines(target)), []
    if not target.is_dir():
        raise CheckpointError(f"{target} is not a folder; give a checkpoint folder or a step-N folder")
    folder = CheckpointFolder(target)
    steps = folder.committed_steps()
    if not steps:
        return "\n".join([f"{target}: no committed steps", *_memory_lines(target)]), []
    lines, unreadable = _steps_lines(target, folder, steps)
    leftovers = sorted(_shown(p.name) for p in target.iterdir() if p.name.startswith(".step-"))
    if leftovers:
        lines.append(f"  leftovers from interrupted saves (removed at next start): {', '.join(leftovers)}")
    return "\n".join(lines + _memory_lines(target)), unreadable


def _steps_lines(target: Any, folder: CheckpointFolder, steps: list[int]) -> tuple[list[str], list[str]]:
    """The folder's title line and one line per committed step; and the steps that could not be read."""
    lines = [f"{target}: {len(steps)} committed step(s)"]
    unreadable = []
    for step in steps:
        try:
            lines.append(f"  step-{step:<8} {_step_summary(folder, step)}")
        except CheckpointError as e:
            unreadable.append(f"step-{step}")
            lines.append(f"  step-{step:<8} CANNOT READ: {e}")
    return lines, unreadable


def _describe_objects(target: ObjectPath) -> tuple[str, list[str]]:
    """:func:`describe` for an ``s3://`` prefix: a step is committed when its manifest exists."""
    from savepoint.checkpoint.object_folder import ObjectFolder, listing

    names = listing(target)
    if {MANIFEST, DCP_MARKER, HF_INDEX} & set(names):
        return "\n".join(_step_lines(target)), []
    folder = ObjectFolder(target)
    steps = folder.committed_steps()
    leftovers = sorted(f"step-{s}" for s in folder._step_prefixes() if s not in steps)
    tail = [f"  leftovers from interrupted saves (no {MANIFEST}; removed at next start): {', '.join(leftovers)}"] \
        if leftovers else []
    if not steps:
        folder.ensure_writable()  # a missing bucket, refused credentials: said as such
        return "\n".join([f"{target}: no committed steps", *tail]), []
    lines, unreadable = _steps_lines(target, folder, steps)
    return "\n".join(lines + tail), unreadable


def _has(step_dir: Any, name: str) -> bool:
    """Something is at ``name`` in the step (a FIFO or symlink too: reading it then reports the damage)."""
    if isinstance(step_dir, ObjectPath):
        from savepoint.checkpoint.object_folder import listing

        return name in listing(step_dir)
    return os.path.lexists(step_dir / name)


def _memory_lines(target: Path) -> list[str]:
    """The in-memory steps of the folder's run on this node, which are not durable steps (see ``memory.py``)."""
    from savepoint.checkpoint.memory_run import memory_steps, read_run

    by_rank = memory_steps(target)
    if not any(by_rank.values()):
        return []
    record = read_run(target) or {}
    where = Path(record.get("memory_folder", "?")) / record.get("run", "?")
    lines = [f"  in memory on this node ({_shown(str(where))}; not durable: lost with the node, "
             "used only by a restart of this job):"]
    lines += [f"    {_shown(rank):<8} steps {', '.join(map(str, steps)) or 'none'}" for rank, steps in by_rank.items()]
    return lines


def _step_summary(folder: CheckpointFolder, step: int) -> str:
    step_dir = folder.step_dir(step)
    manifest = folder.read_manifest(step) or {}
    kind = _shown(manifest.get("kind", "unknown"))
    size = f"{folder.step_bytes(step) / 1e6:10.2f} MB"
    if _has(step_dir, DCP_MARKER):
        keys = f"{len(_read_metadata(step_dir).state_dict_metadata):6} keys"
    else:
        keys = f"{'HF':>6}     "
    return f"{kind:<10} {size} {keys}  {_layout(manifest)}".rstrip()


def _layout(manifest: dict[str, Any]) -> str:
    """Where the step was saved from, e.g. 'saved by 2 processes (dp_replicate 1, dp_shard 2, tp 1)'; the
    pipeline degree leads when the step was saved with one."""
    layout = manifest.get("layout")
    if not isinstance(layout, dict) or not layout:
        return ""

    def degree(key: str) -> str:
        value = layout.get(key, 1)
        return str(value) if type(value) is int else "?"

    world_size = layout.get("world_size")
    who = f"saved by {world_size} process(es)" if type(world_size) is int else "saved by ? process(es)"
    pp = f"pp {degree('pipeline_parallel_degree')}, " if "pipeline_parallel_degree" in layout else ""
    return (f"{who} ({pp}dp_replicate {degree('data_parallel_replicate_degree')}, "
            f"dp_shard {degree('data_parallel_shard_degree')}, tp {degree('tensor_parallel_degree')})")


def _shown(value: Any) -> str:
    """A value from a checkpoint file as it may be printed: plain short text as is, anything else quoted."""
    if isinstance(value, str) and value.isprintable() and len(value) <= 64:
        return value
    text = ascii(value)
    return text if len(text) <= 64 else text[:61] + "..."


def _read_metadata(step_dir: Path) -> Any:
    """The step's ``.metadata``, checked against its manifest and unpickled without running code."""
    from savepoint.checkpoint.reader import VerifyingReader

    return VerifyingReader.for_step(step_dir).read_metadata()


def _step_lines(step_dir: Path) -> list[str]:
    match = STEP_DIR_RE.match(step_dir.name)
    title = f"step {match.group(1)}" if match else _shown(step_dir.name)
    if not _has(step_dir, DCP_MARKER) and isinstance(step_dir, ObjectPath):
        return [f"{step_dir}: {title}, Hugging Face safetensors export, {_bytes(step_dir) / 1e6:.2f} MB "
                "(weights only)"]
    if not _has(step_dir, DCP_MARKER):  # a Hugging Face export (last_save_in_hf)
        from savepoint.hf.folder import HFFolder

        folder = HFFolder(step_dir)
        return [f"{step_dir}: {title}, Hugging Face safetensors export, {folder.total_bytes() / 1e6:.2f} MB, "
                f"{len(folder.keys())} tensors (weights only)"]
    metadata = _read_metadata(step_dir)
    groups: Counter[str] = Counter()
    for key in metadata.state_dict_metadata:
        if not isinstance(key, str):
            raise CorruptCheckpointError(f"{step_dir / DCP_MARKER} is corrupt: it names a stored value by "
                                         f"{_shown(key)}, not by a key string")
        head = key.split(".", 1)[0]
        groups[head if head in EXCLUDABLE else "model"] += 1
    lines = [f"{step_dir}: {title}, {_bytes(step_dir) / 1e6:.2f} MB"]
    lines += [f"  {name:<13} {count} keys" for name, count in sorted(groups.items())]
    return lines


def _bytes(step_dir: Any) -> int:
    if isinstance(step_dir, ObjectPath):
        from savepoint.checkpoint.object_folder import listing

        return sum(listing(step_dir).values())
    return folder_bytes(step_dir)
