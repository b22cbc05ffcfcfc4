"""Which Llama 3 flavor a conversion uses: a name, a ``ModelArgs``, or what the step's manifest records."""

from __future__ import annotations

from pathlib import Path

from savepoint.checkpoint.manifest import read_manifest
from savepoint.checkpoint.objstore import ObjectPath
from savepoint.checkpoint.storage import location
from savepoint.errors import CheckpointError, ConfigError
from savepoint.models.llama3.args import LLAMA3_FLAVORS, ModelArgs

MODEL_NAMES = ("llama3",)
DEFAULT_FLAVOR = "8B"  # TorchTitan's scripts' default, for steps that record none


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


def recorded_flavor(step_dir: Path) -> str | None:
    """The ``--model.flavor`` a step's manifest records; None without a manifest (TorchTitan) or flavor.

    Raises:
        CorruptCheckpointError: the manifest is damaged.
    """
    manifest = read_manifest(step_dir) if isinstance(step_dir, ObjectPath) or step_dir.is_dir() else None
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
    step_dir = location(step_dir)
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
