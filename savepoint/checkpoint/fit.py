"""Does a checkpoint fit the model that loads it: the checks made on a step's entries before any tensor is read.

The trainer (``CheckpointManager``) and the converters (DCP -> Hugging Face, DCP -> torchtune)
all load a DCP step into a model they know by its tensors' shapes. ``check_model_fits`` compares
those shapes with the step's saved entries (``.metadata``'s ``state_dict_metadata``) and names, in
one line, the first tensor that does not fit and the flag to check; ``flavor_hint`` adds the
flavor the step's manifest records; ``check_component`` refuses to resume from a step that lacks a
component (a model-only step) and says which step would do.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from savepoint.checkpoint.manifest import read_manifest
from savepoint.checkpoint.states import EXCLUDABLE
from savepoint.errors import CheckpointError

if TYPE_CHECKING:
    from savepoint.checkpoint.storage import CheckpointFolder


def check_model_fits(saved: Mapping[str, Any], shapes: Mapping[str, Sequence[int]], where: str, *,
                     flag: str = "--model.flavor", model: str | None = None,
                     hint: Callable[[], str] | str = "", names: Mapping[str, str] | None = None,
                     family: Callable[[str], bool] | None = None) -> None:
    """Check that ``saved`` holds every tensor of ``shapes``, as a tensor of the same shape.

    Args:
        saved: the step's entries by key (``read_metadata().state_dict_metadata``); entries that are
            not model tensors (optimizer, train_state, ...) are ignored unless ``family`` claims them.
        shapes: the model's tensors, ``{our key: shape}``.
        where: what the messages start with (the step folder).
        flag: the option that chooses the model, named in every message (``--model.flavor``,
            ``--model_flavor``).
        model: the model's name in messages (``"Llama 3 debugmodel model"``): shapes read
            ``has shape X but the <model> needs Y``. None (the trainer): ``has shape X in the
            checkpoint but Y in the model``.
        hint: appended after ``check <flag>`` (e.g. ``flavor_hint``), or a function computing it,
            called only when a check fails.
        names: ``{our key: saved key}`` where they differ (``compat.saved_model_keys`` for
            TorchTitan 0.3 steps); a key absent from it is saved under its own name.
        family: which saved keys are model tensors at all; one of them that ``shapes`` lacks
            "has no place" in the model (a layer too many). None ignores extra entries.

    Raises:
        CheckpointError: naming the first tensor that has no place in the model, is missing, is not
            a tensor, or has another shape.
    """
    names = names or {}

    def check() -> str:
        return f"check {flag}{hint() if callable(hint) else hint}"

    if family is not None:
        expected = {names.get(k, k) for k in shapes}
        for key in sorted(saved):
            if key not in expected and family(key):
                raise CheckpointError(f"{where}: tensor {key!r} has no place in a {model or 'model of this kind'}; "
                                      f"{check()}")
    for ours, shape in shapes.items():
        key = names.get(ours, ours)
        entry = saved.get(key)
        if entry is None:
            what = f"the checkpoint is not a {model}" if model else "it was saved from a different model"
            raise CheckpointError(f"{where}: model tensor {key!r} is missing; {what}; {check()}")
        if not isinstance(entry, TensorStorageMetadata):
            raise CheckpointError(f"{where}: {key!r} is not a tensor in the checkpoint; {check()}")
        got, want = list(entry.size), list(shape)
        if got != want:
            needs = f"but the {model} needs {want}" if model else f"in the checkpoint but {want} in the model"
            raise CheckpointError(f"{where}: tensor {key!r} has shape {got} {needs}; {check()}")


def flavor_hint(step_dir: Path, flavor: str | None, flag: str = "--model.flavor") -> str:
    """``' (the checkpoint was saved with <flag> X, this run uses Y)'`` when the step's manifest records
    another flavor X than ``flavor``; '' without a manifest (TorchTitan's steps), or when they agree."""
    try:
        saved = (read_manifest(step_dir) or {})["job_config"]["model"]["flavor"]
    except (CheckpointError, KeyError, TypeError):
        return ""
    if flavor is None or saved == flavor:
        return ""
    return f" (the checkpoint was saved with {flag} {saved}, this run uses {flavor})"


def check_component(saved: Mapping[str, Any], name: str, step_dir: Path, folder: CheckpointFolder,
                    source_step: int | None) -> None:
    """Check that ``saved`` holds component ``name`` (some ``<name>.*`` entry) for a resume.

    Raises:
        CheckpointError: it does not (a model-only step): names the latest full step of ``folder``
            other than ``source_step``, else how to start from the step's weights.
    """
    prefix = name + "."
    if any(k.startswith(prefix) for k in saved):
        return
    full_steps = [s for s in folder.committed_steps() if s != source_step and
                  (folder.read_manifest(s) or {}).get("kind", "full") == "full"]
    hint = f"--checkpoint.load_step {full_steps[-1]} (latest full step)" if full_steps else \
        "--checkpoint.initial_load_path " + str(step_dir) + " with an empty --checkpoint.folder"
    raise CheckpointError(
        f"{step_dir} holds no '{name}' state: it is a model-only checkpoint (e.g. the final save with "
        f"--checkpoint.last_save_model_only), which cannot resume training. Use {hint}, or "
        f"--checkpoint.exclude_from_loading {','.join(EXCLUDABLE)} to load only the weights"
    )


__all__ = ["check_component", "check_model_fits", "flavor_hint"]
