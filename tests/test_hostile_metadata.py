"""A crafted ``.metadata`` or stored value runs nothing, changes nothing, costs bounded memory, and fails
every command with one ``error:`` line.

Every forgery here *reseals* the step's manifest (checksums recomputed, as anyone who knows the
format can), so what stops it is the unpickler, not a checksum mismatch. Commands run in-process
through ``savepoint.cli.main`` (the converter script through ``runpy``), on hard-linked copies of
one small checkpoint (steps 1 and 2 of the debug model); a forged file is replaced, never written
through a link.
"""

from __future__ import annotations

import builtins
import functools
import hashlib
import io
import json
import logging
import os
import pickle
import runpy
import shutil
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

from savepoint import cli
from savepoint.checkpoint import lock as lock_module
from savepoint.checkpoint.hashing import hash_file
from savepoint.checkpoint.manifest import manifest_bytes, read_manifest
from savepoint.checkpoint.reader import VerifyingReader
from savepoint.checkpoint.safe_load import safe_unpickle
from savepoint.durable import MANIFEST
from savepoint.errors import UnsafeCheckpointError
from tests.conftest import FAST_ARGS, ROOT, make_config

CONFIG = ROOT / "configs" / "debug_model.toml"
SHORT = ("--training.steps", "2", "--checkpoint.interval", "1", "--lr_scheduler.warmup_steps", "1")


# ---- forgeries ----------------------------------------------------------------------------------

class _Call:
    """Pickles to ``func(*args)``: whoever unpickles it with the stock unpickler makes that call."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def payloads(marker: Path) -> dict[str, bytes]:
    """Pickles that each create ``marker`` when unpickled the usual way."""
    command = f"touch {marker}"
    return {
        "os.system": pickle.dumps(_Call(os.system, command), protocol=2),
        "builtins.exec": pickle.dumps(_Call(builtins.exec, f"import os; os.system({command!r})")),
        "subprocess.Popen": pickle.dumps(_Call(subprocess.Popen, ["touch", str(marker)])),
        "functools.partial chain": pickle.dumps(_Call(functools.partial(functools.partial(os.system, command)))),
        "INST (protocol 0)": b"(S'" + command.encode() + b"'\nios\nsystem\n.",
    }


def _global(module: str, name: str) -> bytes:
    return (pickle.SHORT_BINUNICODE + bytes([len(module)]) + module.encode()
            + pickle.SHORT_BINUNICODE + bytes([len(name)]) + name.encode() + pickle.STACK_GLOBAL)


def _text(value: str) -> bytes:
    return pickle.SHORT_BINUNICODE + bytes([len(value)]) + value.encode()


META = "torch.distributed.checkpoint.metadata"


def class_mutations() -> dict[str, bytes]:
    """Pickles that name only allowed objects but set state on a class or a shared object."""
    header = pickle.PROTO + b"\x04"
    return {
        # (None, {"__hash__": None}) as BUILD's state: the stock unpickler setattr()s it on the class.
        "MetadataIndex.__hash__ = None": header + _global(META, "MetadataIndex") + pickle.NONE
        + pickle.EMPTY_DICT + _text("__hash__") + pickle.NONE + pickle.SETITEM + pickle.TUPLE2
        + pickle.BUILD + pickle.STOP,
        # The enum member every TensorProperties shares.
        "enum member state": header + _global(META, "_MEM_FORMAT_ENCODING") + pickle.BININT1 + b"\x00"
        + pickle.TUPLE1 + pickle.REDUCE + pickle.EMPTY_DICT + _text("_value_") + pickle.BININT1 + b"\x07"
        + pickle.SETITEM + pickle.BUILD + pickle.STOP,
        # The layout lookup's cache, an attribute of a torch function: "torch.strided" -> sparse_coo.
        "function attribute": header + _global("torch.serialization", "_get_layout") + pickle.EMPTY_DICT
        + _text("cache") + pickle.EMPTY_DICT + _text("torch.strided") + _global("torch", "sparse_coo")
        + pickle.SETITEM + pickle.SETITEM + pickle.BUILD + pickle.STOP,
    }


def reseal(step: Path) -> None:
    """Recompute every checksum of the step's manifest (if it has one) as a forger would."""
    if not (step / MANIFEST).exists():
        return
    manifest = read_manifest(step)
    for name in manifest["checksums"]["files"]:
        manifest["checksums"]["files"][name] = hash_file(step / name)
        if isinstance(manifest.get("files"), dict):
            manifest["files"][name] = (step / name).stat().st_size
    replace(step / MANIFEST, manifest_bytes(manifest))


def replace(path: Path, data: bytes) -> None:
    path.unlink()  # the copies are hard links: never write through one
    path.write_bytes(data)


def plant_metadata(step: Path, data: bytes) -> None:
    replace(step / ".metadata", data)
    reseal(step)


def plant_tensor_item(step: Path, fqn: str, marker: Path) -> str:
    """Point ``fqn``'s stored bytes at a torch.save of a call to os.system; returns the data file's name."""
    metadata = pickle.loads((step / ".metadata").read_bytes())  # our own file: trusted here
    assert isinstance(metadata.state_dict_metadata[fqn], TensorStorageMetadata)
    info = next(i for index, i in metadata.storage_data.items() if index.fqn == fqn)
    meta = metadata.state_dict_metadata[fqn]
    buffer = io.BytesIO()  # as many bytes as the tensor's, so that only unpickling it can tell
    torch.save([_Call(os.system, f"touch {marker}"), bytes(meta.size.numel() * meta.properties.dtype.itemsize)],
               buffer)
    path = step / info.relative_path
    data = path.read_bytes()
    info.offset, info.length = len(data), len(buffer.getvalue())
    replace(path, data + buffer.getvalue())
    replace(step / ".metadata", pickle.dumps(metadata))
    reseal(step)
    return info.relative_path


# ---- the checkpoint and the commands ------------------------------------------------------------

@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A dump folder with committed full steps 1 and 2 of the debug model."""
    from savepoint.train import Trainer

    dump = tmp_path_factory.mktemp("hostile") / "base"
    trainer = Trainer(make_config(dump, *SHORT))
    trainer.train()
    trainer.checkpointer.close()
    return dump


@pytest.fixture
def dump(base_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(base_run, copy, copy_function=os.link)
    return copy


def train_argv(dump: Path, *extra: str) -> list[str]:
    return ["train", "--job.config_file", str(CONFIG), "--job.dump_folder", str(dump), *FAST_ARGS, *SHORT,
            "--training.steps", "3", *extra]


def commands(dump: Path, out: Path) -> dict[str, list[str]]:
    """Every command that reads a step, on step-2 (the latest), each writing (if at all) under ``out``."""
    root, step = dump / "checkpoint", dump / "checkpoint/step-2"
    return {
        "train --checkpoint.load_step": train_argv(dump, "--checkpoint.load_step", "2"),
        "train (auto-resume)": train_argv(dump),
        "inspect STEP_DIR": ["inspect", str(step)],
        "inspect FOLDER": ["inspect", str(root)],
        "verify STEP_DIR": ["verify", str(step)],
        "verify FOLDER": ["verify", str(root)],
        "convert to_hf": ["convert", "to_hf", str(step), str(out / "hf"), "--model_flavor", "debugmodel"],
        "convert to_torchtune": ["convert", "to_torchtune", str(step), str(out / "tune.pt"),
                                 "--model_flavor", "debugmodel"],
        "convert_to_hf.py": ["script:scripts/checkpoint_conversion/convert_to_hf.py", str(step), str(out / "hf2"),
                             "--model_flavor", "debugmodel"],
    }


def run(argv: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """``savepoint <argv>`` (or ``python SCRIPT <argv>`` for ``script:SCRIPT``) in this process."""
    monkeypatch.delenv("SAVEPOINT_DEBUG", raising=False)
    logger = logging.getLogger("savepoint")
    handlers = list(logger.handlers)
    capsys.readouterr()
    try:
        if argv[0].startswith("script:"):
            script = str(ROOT / argv[0][len("script:"):])
            monkeypatch.setattr(sys, "argv", [script, *argv[1:]])
            try:
                runpy.run_path(script, run_name="__main__")
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
        else:
            code = cli.main(argv)
    finally:
        for handler in logger.handlers[len(handlers):]:
            logger.removeHandler(handler)
        lock_module._release_all()
    out = capsys.readouterr()
    return code, out.out, out.err


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != lock_module.LOCK_NAME}


def assert_one_error(code: int, out: str, err: str, *expect: str) -> str:
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), f"exit {code}, stderr:\n{err}"
    for want in expect:
        assert want in lines[0] or want in out, f"{want!r} neither in {lines[0]!r} nor in stdout:\n{out[-2000:]}"
    return lines[0]


# ---- 1. no command runs code from .metadata --------------------------------------------------------

KINDS = [(kind, True) for kind in payloads(Path("x"))] + [("os.system", False), ("INST (protocol 0)", False)]


@pytest.mark.parametrize(("kind", "sealed"), KINDS,
                         ids=[f"{k}, {'resealed manifest' if s else 'no manifests (TorchTitan)'}" for k, s in KINDS])
def test_every_command_refuses_hostile_metadata(kind, sealed, dump, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "PWNED"
    step = dump / "checkpoint/step-2"
    if not sealed:
        for manifest in (dump / "checkpoint").glob(f"step-*/{MANIFEST}"):
            manifest.unlink()
    plant_metadata(step, payloads(marker)[kind])
    before = snapshot(dump / "checkpoint")
    for name, argv in commands(dump, tmp_path / "out").items():
        code, out, err = run(argv, capsys, monkeypatch)
        assert not marker.exists(), f"{name} ran the payload"
        line = assert_one_error(code, out, err, f"{step}/.metadata asks to load", "Nothing was executed")
        assert "Traceback" not in err + out, name
        assert line.count("\n") == 0
    assert snapshot(dump / "checkpoint") == before
    result = pickle.loads((step / ".metadata").read_bytes())  # the usual way, it does run: the threat is real
    if isinstance(result, subprocess.Popen):
        result.wait()
    assert marker.exists()


def test_refused_name_is_shown_on_one_line():
    forged = pickle.PROTO + b"\x04" + _global("os\n\x1b[2J", "system") + pickle.STOP
    with pytest.raises(UnsafeCheckpointError) as err:
        safe_unpickle(forged, "x/.metadata")
    assert "\n" not in str(err.value) and "\x1b" not in str(err.value) and "asks to load 'os\\n" in str(err.value)


def test_no_other_unpickling_of_checkpoint_files():
    """``.metadata`` is read only through VerifyingReader (the restricted unpickler): no stock reader anywhere."""
    tracked = subprocess.run(["git", "ls-files", "savepoint", "scripts", "benchmarks", "tests/trials"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    offenders = []
    for name in tracked:
        if not name.endswith(".py") or name == "savepoint/checkpoint/safe_load.py":
            continue
        text = (ROOT / name).read_text()
        for needle in ("pickle.load(", "pickle.loads(", "pickle.Unpickler", "FileSystemReader(", "weights_only=False"):
            if needle in text:
                offenders.append(f"{name}: {needle}")
    # FileSystemReader is subclassed by the verifying reader, and named in a docstring; not instantiated.
    assert [o for o in offenders if "FileSystemReader(" not in o or "checkpoint/reader.py" not in o] == []


# ---- 2. memory is bounded by the file, not by the indices it names -------------------------------

def _peak_bytes(data: bytes) -> int:
    tracemalloc.start()
    try:
        try:
            safe_unpickle(data, "x/.metadata")
        except UnsafeCheckpointError:
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memo_index_does_not_allocate():
    """LONG_BINPUT 2**24 in a 9-byte file: the C unpickler allocated a 2**25-slot memo table (256 MiB) for it."""
    bomb = pickle.PROTO + b"\x04" + pickle.NONE + pickle.LONG_BINPUT + struct.pack("<I", 2 ** 24) + pickle.STOP
    assert len(bomb) == 9
    assert _peak_bytes(bomb) < 1 << 20
    many = pickle.PROTO + b"\x04" + pickle.NONE + b"".join(
        pickle.LONG_BINPUT + struct.pack("<I", (2 ** 31 - 1) - i * 7919) for i in range(1000)) + pickle.STOP
    assert _peak_bytes(many) < 1 << 20


def test_bytearray8_does_not_allocate_before_reading():
    forged = pickle.PROTO + b"\x05" + pickle.BYTEARRAY8 + struct.pack("<Q", 1 << 40) + pickle.STOP
    with pytest.raises(UnsafeCheckpointError, match="BYTEARRAY8"):
        safe_unpickle(forged, "x/.metadata")


# ---- 3. a pickle cannot change the classes it is allowed to build --------------------------------

@pytest.mark.parametrize("kind", list(class_mutations()))
def test_no_state_set_on_classes_or_shared_objects(kind, base_run):
    from torch.distributed.checkpoint import metadata as dcp_metadata

    healthy = (base_run / "checkpoint/step-1/.metadata").read_bytes()
    hash_before = MetadataIndex.__dict__["__hash__"]
    member = dcp_metadata._MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT
    state_before = dict(member.__dict__)
    layout_cache = torch.serialization._get_layout.cache
    try:
        with pytest.raises(UnsafeCheckpointError, match="set the state of|Nothing was executed"):
            safe_unpickle(class_mutations()[kind], "x/.metadata")
        assert MetadataIndex.__dict__["__hash__"] is hash_before
        assert dict(member.__dict__) == state_before
        assert torch.serialization._get_layout("torch.strided") is torch.strided
        assert safe_unpickle(healthy, "step-1/.metadata") == pickle.loads(healthy)
    finally:  # against an unpickler that lets it through, keep the damage out of the other tests
        MetadataIndex.__hash__ = hash_before
        member.__dict__.update(state_before)
        torch.serialization._get_layout.cache = layout_cache


def test_state_is_set_once_per_object():
    """A second BUILD on a MetadataIndex (already a dict key, say) would change it under the dict."""
    index = MetadataIndex("w", [0])
    data = pickle.dumps(index, protocol=4)
    assert data.endswith(pickle.BUILD + pickle.STOP)
    twice = data[:-1] + pickle.EMPTY_DICT + _text("fqn") + _text("v") + pickle.SETITEM + pickle.BUILD + pickle.STOP
    assert safe_unpickle(data, "x") == index
    with pytest.raises(UnsafeCheckpointError, match="set the state of"):
        safe_unpickle(twice, "x/.metadata")


def test_healthy_step_loads_after_a_hostile_one(dump, capsys, monkeypatch):
    """In one process: the hostile step fails, then the healthy step before it loads and training goes on."""
    plant_metadata(dump / "checkpoint/step-2", class_mutations()["MetadataIndex.__hash__ = None"])
    hash_before = MetadataIndex.__dict__["__hash__"]
    try:
        code, out, err = run(train_argv(dump), capsys, monkeypatch)
        assert_one_error(code, out, err, "step-2/.metadata asks to set the state of the class", "MetadataIndex")
        code, out, err = run(train_argv(dump, "--checkpoint.load_step", "1"), capsys, monkeypatch)
        assert code == 0, err
        assert "loaded" in out and "step-1" in out
    finally:
        MetadataIndex.__hash__ = hash_before


# ---- 4. a hostile pickle inside a stored tensor ---------------------------------------------------

def test_hostile_tensor_item_is_one_line(dump, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "PWNED"
    step = dump / "checkpoint/step-2"
    file = plant_tensor_item(step, "tok_embeddings.weight", marker)
    out_dir = tmp_path / "out"
    for argv in (train_argv(dump, "--checkpoint.load_step", "2"),
                 ["convert", "to_hf", str(step), str(out_dir / "hf"), "--model_flavor", "debugmodel"],
                 ["convert", "to_torchtune", str(step), str(out_dir / "t.pt"), "--model_flavor", "debugmodel"]):
        code, out, err = run(argv, capsys, monkeypatch)
        assert_one_error(code, out, err, "'tok_embeddings.weight'", str(step / file), "asks to load posix.system",
                         "Nothing was executed")
        assert "weights_only" not in err  # torch's advice to retry unsafely is not passed on
        assert not marker.exists()


# ---- 5. inspect treats every manifest value as untrusted ------------------------------------------

def _edit_manifest(step: Path, edit) -> None:
    manifest = json.loads((step / MANIFEST).read_bytes())  # as it is, even when an earlier edit broke it
    edit(manifest)
    manifest.pop("manifest_checksum", None)
    replace(step / MANIFEST, manifest_bytes(manifest))


def test_inspect_folder_with_odd_manifests(dump, capsys, monkeypatch):
    root = dump / "checkpoint"
    _edit_manifest(root / "step-1", lambda m: (m.pop("kind"), m.pop("layout")))
    _edit_manifest(root / "step-2", lambda m: m["layout"].pop("world_size"))
    code, out, err = run(["inspect", str(root)], capsys, monkeypatch)
    assert_one_error(code, out, err, "1 step(s)", "step-2", "savepoint verify")
    assert "step-1        unknown" in out
    assert f"step-2        CANNOT READ: {root}/step-2/{MANIFEST} is corrupt" in out and "world_size" in out
    _edit_manifest(root / "step-2", lambda m: m.update(layout={"world_size": 2}, kind="full\x1b[2J"))
    code, out, err = run(["inspect", str(root)], capsys, monkeypatch)
    assert code == 0, err
    assert "saved by 2 process(es) (dp_replicate 1, dp_shard 1, tp 1)" in out and "\x1b" not in out


def test_inspect_step_reads_through_the_checked_reader(dump, monkeypatch):
    """inspect reads .metadata only through VerifyingReader: a changed byte is caught by the checksum."""
    step = dump / "checkpoint/step-1"
    calls = []
    real = VerifyingReader.read_metadata
    monkeypatch.setattr(VerifyingReader, "read_metadata", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    from savepoint.inspect import describe

    text, unreadable = describe(step)
    assert "model " in text and "optimizer" in text and unreadable == [] and calls


# ---- setups for tests/test_bad_input.py's HOSTILE_READ_CASES (its base run: steps 5 and 10) ---------

def bad_input_hostile_metadata(dump: Path, mp: pytest.MonkeyPatch) -> list[str]:
    plant_metadata(dump / "checkpoint/step-10", payloads(dump / "PWNED")["os.system"])
    return []


def bad_input_class_mutation(dump: Path, mp: pytest.MonkeyPatch) -> list[str]:
    plant_metadata(dump / "checkpoint/step-10", class_mutations()["MetadataIndex.__hash__ = None"])
    mp.setattr(MetadataIndex, "__hash__", MetadataIndex.__dict__["__hash__"])  # restored even if it got through
    return []


def bad_input_memo_index(dump: Path, mp: pytest.MonkeyPatch) -> list[str]:
    bomb = pickle.PROTO + b"\x04" + pickle.NONE + pickle.LONG_BINPUT + struct.pack("<I", 2 ** 24) + pickle.STOP
    plant_metadata(dump / "checkpoint/step-10", bomb)
    return ["--checkpoint.load_step", "10"]


def bad_input_hostile_tensor(dump: Path, mp: pytest.MonkeyPatch) -> list[str]:
    plant_tensor_item(dump / "checkpoint/step-10", "tok_embeddings.weight", dump / "PWNED")
    return ["--checkpoint.load_step", "10"]


def bad_input_no_world_size(dump: Path, mp: pytest.MonkeyPatch) -> list[str]:
    _edit_manifest(dump / "checkpoint/step-10", lambda m: m["layout"].pop("world_size"))
    return []
