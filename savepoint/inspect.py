"""``savepoint inspect``: what a checkpoint folder or one step holds, without loading tensors."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from torch.distributed.checkpoint import FileSystemReader

from savepoint.checkpoint.states import EXCLUDABLE
from savepoint.checkpoint.storage import STEP_DIR_RE, CheckpointFolder, folder_bytes
from savepoint.errors import CheckpointError


def describe(path: str) -> str:
    """A human-readable summary of a checkpoint folder (its steps) or of a single step folder.

    Raises:
        CheckpointError: the path is neither.
    """
    target = Path(path)
    if CheckpointFolder.is_committed(target):
        return describe_step(target)
    if not target.is_dir():
        raise CheckpointError(f"{target} is not a folder; give a checkpoint folder or a step-N folder")
    folder = CheckpointFolder(target)
    steps = folder.committed_steps()
    if not steps:
        return f"{target}: no committed steps"
    lines = [f"{target}: {len(steps)} committed step(s)"]
    for step in steps:
        manifest = folder.read_manifest(step) or {}
        size = folder_bytes(folder.step_dir(step))
        lines.append(f"  step-{step:<8} {manifest.get('kind', 'unknown'):<10} {size / 1e6:10.2f} MB"
                     f"  {_layout(manifest)}")
    leftovers = [p.name for p in target.iterdir() if p.name.startswith(".step-")]
    if leftovers:
        lines.append(f"  leftovers from interrupted saves (removed at next start): {', '.join(leftovers)}")
    return "\n".join(lines)


def _layout(manifest: dict) -> str:
    """Where the step was saved from, e.g. 'saved by 2 processes (dp_replicate 1, dp_shard 2, tp 1)'."""
    layout = manifest.get("layout")
    if not layout:
        return ""
    degrees = (f"dp_replicate {layout.get('data_parallel_replicate_degree', 1)}, "
               f"dp_shard {layout.get('data_parallel_shard_degree', 1)}, tp {layout.get('tensor_parallel_degree', 1)}")
    return f"saved by {layout['world_size']} process(es) ({degrees})"


def describe_step(step_dir: Path) -> str:
    if not (step_dir / ".metadata").is_file():  # a Hugging Face export (last_save_in_hf)
        from savepoint.hf.folder import HFFolder

        folder = HFFolder(step_dir)
        return (f"{step_dir}: Hugging Face safetensors export, {folder.total_bytes() / 1e6:.2f} MB, "
                f"{len(folder.keys())} tensors (weights only)")
    metadata = FileSystemReader(str(step_dir)).read_metadata()
    groups: Counter[str] = Counter()
    for key in metadata.state_dict_metadata:
        head = key.split(".", 1)[0]
        groups[head if head in EXCLUDABLE else "model"] += 1
    match = STEP_DIR_RE.match(step_dir.name)
    title = f"step {match.group(1)}" if match else step_dir.name
    lines = [f"{step_dir}: {title}, {folder_bytes(step_dir) / 1e6:.2f} MB"]
    lines += [f"  {name:<13} {count} keys" for name, count in sorted(groups.items())]
    return "\n".join(lines)
