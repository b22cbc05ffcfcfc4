"""Ways to damage or forge a committed step, shared by the hostile-checkpoint tests and the bad-input table.

Each function takes the step folder (or the checkpoint folder) and damages it the way a crafted or
broken checkpoint would. Forgeries that change a file also *reseal* the manifest: its checksums
and its own checksum are recomputed, as an attacker who knows the format would, so each check
under test has to stand on its own rather than lean on a checksum mismatch.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from savepoint.checkpoint.hashing import hash_file
from savepoint.checkpoint.manifest import manifest_bytes
from savepoint.durable import MANIFEST

GB3 = 3 * 1024 ** 3


def load_manifest(step: Path) -> dict[str, Any]:
    return json.loads((step / MANIFEST).read_text())


def reseal(step: Path, manifest: dict[str, Any] | None = None, rehash: tuple[str, ...] = ()) -> None:
    """Write ``manifest`` (default: the current one) with the named files re-hashed and a valid self-checksum."""
    manifest = load_manifest(step) if manifest is None else manifest
    for name in rehash:
        manifest["checksums"]["files"][name] = hash_file(step / name)
        manifest["files"][name] = (step / name).stat().st_size
    (step / MANIFEST).write_bytes(manifest_bytes(manifest))


def forge_metadata(step: Path, edit: Callable[[Any], None]) -> None:
    """Unpickle our own ``.metadata`` (trusted here), ``edit`` it, write it back and reseal the manifest."""
    path = step / ".metadata"
    metadata = pickle.loads(path.read_bytes())
    edit(metadata)
    path.write_bytes(pickle.dumps(metadata))
    if (step / MANIFEST).exists():
        reseal(step, rehash=(".metadata",))


def first_item(metadata: Any, fqn: str = "tok_embeddings.weight") -> Any:
    return next(info for index, info in metadata.storage_data.items() if index.fqn == fqn)


# ---- manifest.json --------------------------------------------------------------------------------

def deep_manifest(step: Path) -> None:
    (step / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)


def deep_object_manifest(step: Path) -> None:
    (step / MANIFEST).write_text('{"a": ' * 100_000 + "1" + "}" * 100_000)


def files_is_a_list(step: Path) -> None:
    manifest = load_manifest(step)
    manifest["checksums"]["files"] = sorted(manifest["checksums"]["files"])
    reseal(step, manifest)


def top_files_is_a_list(step: Path) -> None:
    manifest = load_manifest(step)
    manifest["files"] = sorted(manifest["files"])
    reseal(step, manifest)


def segment_is_a_string(step: Path) -> None:
    manifest = load_manifest(step)
    manifest["checksums"]["files"]["__0_0.distcp"]["segments"][3] = "0-10"
    reseal(step, manifest)


def job_config_is_a_list(step: Path) -> None:
    manifest = load_manifest(step)
    manifest["job_config"] = ["model", "debugmodel"]
    reseal(step, manifest)


def sparse_manifest(step: Path) -> None:
    with open(step / MANIFEST, "r+b") as f:
        f.truncate(GB3)


def names_etc_shadow(step: Path) -> None:
    manifest = load_manifest(step)
    manifest["checksums"]["files"]["/etc/shadow"] = {"size": 1, "segments": [[0, 1, "0" * 32]]}
    reseal(step, manifest)


def names_a_parent_file(step: Path) -> None:
    manifest = load_manifest(step)
    manifest["checksums"]["files"]["../step-5/__0_0.distcp"] = {"size": 1, "segments": [[0, 1, "0" * 32]]}
    reseal(step, manifest)


def whole_file_segments(step: Path) -> None:
    """200 copies of one segment covering the whole data file, each with the file's true hash."""
    manifest = load_manifest(step)
    whole = hash_file(step / "__0_0.distcp", block=(step / "__0_0.distcp").stat().st_size)["segments"][0]
    manifest["checksums"]["files"]["__0_0.distcp"]["segments"] = [whole] * 200
    reseal(step, manifest)


def one_whole_file_segment(step: Path) -> None:
    """One honest segment over the whole data file: every item read would re-read all of it."""
    manifest = load_manifest(step)
    manifest["checksums"]["files"]["__0_0.distcp"]["segments"] = \
        hash_file(step / "__0_0.distcp", block=(step / "__0_0.distcp").stat().st_size)["segments"]
    reseal(step, manifest)


def no_segments(step: Path) -> None:
    """Segments gone: the data file's bytes would be read unchecked."""
    manifest = load_manifest(step)
    manifest["checksums"]["files"]["__0_0.distcp"]["segments"] = []
    reseal(step, manifest)


def manifest_deleted(step: Path) -> None:
    (step / MANIFEST).unlink()


def checksums_deleted(step: Path) -> None:
    manifest = load_manifest(step)
    del manifest["checksums"]
    reseal(step, manifest)


def manifest_is_a_folder(step: Path) -> None:
    (step / MANIFEST).unlink()
    (step / MANIFEST).mkdir()


# ---- .metadata ------------------------------------------------------------------------------------

def sparse_metadata(step: Path) -> None:
    with open(step / ".metadata", "r+b") as f:
        f.truncate(GB3)


def offset_past_end(step: Path) -> None:
    size = (step / "__0_0.distcp").stat().st_size
    forge_metadata(step, lambda md: setattr(first_item(md), "offset", size + 10))


def offset_2_40(step: Path) -> None:
    forge_metadata(step, lambda md: setattr(first_item(md), "offset", 2 ** 40))


def length_2_40(step: Path) -> None:
    forge_metadata(step, lambda md: setattr(first_item(md), "length", 2 ** 40))


def huge_shape(step: Path) -> None:
    """An optimizer state whose recorded shape (and only chunk) is [2**31, 2**31]: 2**62 elements."""
    import torch

    def edit(md: Any) -> None:
        meta = md.state_dict_metadata["optimizer.state.tok_embeddings.weight.exp_avg"]
        meta.size = torch.Size([2 ** 31, 2 ** 31])
        meta.chunks[0].sizes = torch.Size([2 ** 31, 2 ** 31])

    forge_metadata(step, edit)


def huge_model_shape(step: Path) -> None:
    import torch

    def edit(md: Any) -> None:
        meta = md.state_dict_metadata["tok_embeddings.weight"]
        meta.size = torch.Size([2 ** 31, 2 ** 31])
        meta.chunks[0].sizes = torch.Size([2 ** 31, 2 ** 31])

    forge_metadata(step, edit)


def _outside_copy(step: Path) -> Path:
    """A copy of the step's data file outside the checkpoint folder (in the dump folder)."""
    outside = step.parent.parent / "outside.distcp"
    shutil.copyfile(step / "__0_0.distcp", outside)
    return outside


def absolute_relative_path(step: Path) -> None:
    outside = _outside_copy(step)

    def edit(md: Any) -> None:
        for info in md.storage_data.values():
            info.relative_path = str(outside)

    forge_metadata(step, edit)


def dotdot_relative_path(step: Path) -> None:
    _outside_copy(step)

    def edit(md: Any) -> None:
        for info in md.storage_data.values():
            info.relative_path = "../../outside.distcp"

    forge_metadata(step, edit)


# ---- data files and step folders ------------------------------------------------------------------

def symlinked_step(step: Path) -> None:
    elsewhere = step.parent.parent / "elsewhere"
    elsewhere.mkdir()
    shutil.move(step, elsewhere / step.name)
    os.symlink(elsewhere / step.name, step)


def symlinked_data_file(step: Path) -> None:
    outside = _outside_copy(step)
    (step / "__0_0.distcp").unlink()
    os.symlink(outside, step / "__0_0.distcp")


def fifo_data_file(step: Path) -> None:
    (step / "__0_0.distcp").unlink()
    os.mkfifo(step / "__0_0.distcp")


def fifo_bytes_item(step: Path) -> None:
    """A stored non-tensor item (the train step counter) placed in a file that is a FIFO."""
    os.mkfifo(step / "extra.bin")

    def edit(md: Any) -> None:
        for index, info in md.storage_data.items():
            if index.fqn.startswith("train_state."):
                info.relative_path = "extra.bin"
                info.offset = 0

    forge_metadata(step, edit)


def as_torchtitan(root: Path) -> None:
    """Every step of the folder as TorchTitan writes it: no manifest, written in place (used with other damage)."""
    from torch.distributed.checkpoint.metadata import StorageMeta

    for step in sorted(root.glob("step-*")):
        (step / MANIFEST).unlink()
        forge_metadata(step, lambda md, step=step: setattr(md, "storage_meta", StorageMeta(checkpoint_id=str(step))))


def nothing(step: Path) -> None:
    """No damage (for rows whose damage is elsewhere, e.g. ``as_torchtitan``)."""
