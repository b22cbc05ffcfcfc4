"""Bad input, one table: each row is one clear error, a non-zero exit, and no existing checkpoint touched.

Every row starts from a copy of the same checkpoint folder (committed full steps 5 and 10 of the
debug model, written once per module), does what a user might do wrong, and runs ``savepoint
train`` on it. The row then expects:

- exactly one line on stderr, ``error: ...``, that names what is wrong, where (path, key, step or
  tensor) and how to fix it (the row lists the words it must contain), and no traceback;
- exit status 1;
- every file under the checkpoint folder byte-identical to what it was before the run (the lock
  file ``.savepoint.lock`` aside). Files a row damaged on purpose are hashed *after* the damage, so
  they must stay as damaged: nothing "repairs" or deletes them either.

Rows run in-process through ``savepoint.cli.main`` (torch is imported once), except the disk-full
row, which needs a file size limit (``RLIMIT_FSIZE``) that must not leak into the test process.
The pipeline-parallel rows run ``savepoint check`` with ``SAVEPOINT_WORLD_SIZE``, as ``run_train.sh``
does with ``NGPU`` before it starts any process.
The SIGTERM row is not an error: a preempted job commits the step and exits 0 (see its comment).

``BAD_INPUT_MESSAGES`` collects each row's message; ``SAVEPOINT_BAD_INPUT_REPORT=path`` writes them
to a JSON file, from which `scripts/bad_input_doc.py` writes docs/bad-input.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from savepoint.checkpoint.lock import LOCK_NAME, FolderLock
from savepoint.checkpoint.storage import CheckpointFolder
from savepoint.checkpoint.verify import verify_step
from savepoint.models.llama3 import LLAMA3_FLAVORS
from tests import hostile
from tests import test_hostile_metadata as hm
from tests import test_pipeline_plan as pipeline_rows
from tests.conftest import FAST_ARGS, ROOT, make_config, run_cli

CONFIG = ROOT / "configs" / "debug_model.toml"
STEPS = ("--training.steps", "10")  # the base run's length: resuming it has nothing left to train
BAD_INPUT_MESSAGES: dict[str, str] = {}

# A second flavor for the mismatch row: the debug model at half the width (registered only for that row).
NARROW = "debugmodel_narrow"


@dataclass
class Case:
    """One row: ``setup(dump)`` damages a copy of the base run and returns extra CLI arguments."""

    setup: Callable[[Path, pytest.MonkeyPatch], list[str]]
    expect: list[str]  # substrings of the one error line, after "error: " ({dump} = the run's dump folder)
    config: Callable[[Path], Path] | None = None  # a TOML file to use instead of debug_model.toml
    subprocess: bool = False
    exit_code: int = 1
    new_steps: list[int] = field(default_factory=list)  # steps the row may add (SIGTERM row only)
    # The whole command line after ``savepoint`` for rows that run another command than ``train``
    # (inspect, verify, convert); ``{dump}`` in it is the run's dump folder. None: train, as above.
    command: list[str] | None = None
    # SAVEPOINT_WORLD_SIZE for the row, as run_train.sh sets it from NGPU before `savepoint check`.
    world_size: int | None = None


# ---- row setups ---------------------------------------------------------------------------------

def nothing(dump: Path, mp: pytest.MonkeyPatch) -> list[str]:
    return []


def args(*extra: str) -> Callable[[Path, pytest.MonkeyPatch], list[str]]:
    return lambda dump, mp: list(extra)


def toml_syntax_error(dump: Path) -> Path:
    path = dump / "broken.toml"
    path.write_text(CONFIG.read_text().replace("[training]", "[training", 1))
    return path


def folder_is_a_file(dump: Path, mp: pytest.MonkeyPatch) -> list[str]:
    (dump / "notes.txt").write_text("not a folder\n")
    return ["--checkpoint.folder", "notes.txt"]


def read_only_folder(dump: Path, mp: pytest.MonkeyPatch) -> list[str]:
    root = dump / "checkpoint"
    root.chmod(0o500)
    if os.geteuid() == 0:
        # root passes every permission check (access(2) says W_OK on a 0o500 folder, and writes
        # succeed), so a real read-only folder cannot be made here without a read-only mount. Ask
        # the question the kernel asks a non-root owner instead: "does the owner have write permission?".
        real_access = os.access

        def owner_access(path, mode, *a, **kw):
            if Path(path) == root and mode & os.W_OK:
                return bool(os.stat(path).st_mode & stat.S_IWUSR) and real_access(path, mode, *a, **kw)
            return real_access(path, mode, *a, **kw)

        mp.setattr(os, "access", owner_access)
    return []


def truncate_distcp(dump: Path, mp: pytest.MonkeyPatch) -> list[str]:
    path = dump / "checkpoint/step-10/__0_0.distcp"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    return ["--checkpoint.load_step", "10"]


def corrupt_metadata(dump: Path, mp: pytest.MonkeyPatch) -> list[str]:
    path = dump / "checkpoint/step-10/.metadata"
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(16)  # 16 zero bytes over the middle of the pickle
    path.write_bytes(bytes(data))
    return ["--checkpoint.load_step", "10"]


def empty_step(dump: Path, mp: pytest.MonkeyPatch) -> list[str]:
    (dump / "checkpoint/step-15").mkdir()
    return ["--checkpoint.load_step", "15"]


def other_flavor(dump: Path, mp: pytest.MonkeyPatch) -> list[str]:
    narrow = dataclasses.replace(LLAMA3_FLAVORS["debugmodel"], dim=128, n_heads=8, n_kv_heads=4)
    mp.setitem(LLAMA3_FLAVORS, NARROW, narrow)
    return ["--model.flavor", NARROW]  # the checkpoint holds debugmodel (dim 256)


def second_writer(dump: Path, mp: pytest.MonkeyPatch) -> list[str]:
    """Hold the folder's lock as another job would: flock it, and write that job's details into it.

    flock conflicts between open file descriptions, so a lock held by this test process refuses the
    run in the same process; the details in the file are what another host's job would have written.
    """
    holder = FolderLock(dump / "checkpoint")
    holder.acquire()
    other_job = {"host": "node-7", "pid": 4242, "started": "2025-01-01 00:00:00 UTC", "started_unix": 1735689600.0,
                 "command": "python -m savepoint train --job.config_file configs/debug_model.toml"}
    os.pwrite(holder._fd, json.dumps(other_job).encode().ljust(4096), 0)  # type: ignore[arg-type]
    mp.setattr(sys.modules[__name__], "_HELD", holder)
    return []


_HELD: FolderLock | None = None


def sigterm_mid_save(dump: Path, mp: pytest.MonkeyPatch) -> list[str]:
    """SIGTERM arrives while step 11 is being saved (its files are written, the rename is next)."""
    original = CheckpointFolder.commit

    def commit(self, step, manifest):
        if step == 11:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, step, manifest)

    mp.setattr(CheckpointFolder, "commit", commit)
    return ["--training.steps", "20", "--checkpoint.interval", "11"]  # resume at 10, save 11


DISK_FULL_DRIVER = r"""
import resource, signal, sys
from savepoint import cli
from savepoint.checkpoint.manager import CheckpointManager

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
original = CheckpointManager.save

def save(self, step, last_step=False):
    if not last_step:
        return original(self, step, last_step)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, hard))  # the disk is full from the final save on
    try:
        return original(self, step, last_step)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

CheckpointManager.save = save
sys.exit(cli.main(sys.argv[1:]))
"""


# ---- the table ----------------------------------------------------------------------------------

CASES: dict[str, Case] = {
    "TOML syntax error": Case(nothing, ["{dump}/broken.toml", "TOML syntax error", "line 12, column 10",
                                        "fix the file"], config=toml_syntax_error),
    "unknown key": Case(args("--checkpoint.intervall", "5"),
                        ["--checkpoint.intervall", "did you mean --checkpoint.interval?"]),
    "wrong type": Case(args("--checkpoint.interval", "ten"), ["--checkpoint.interval", "ten", "int"]),
    "checkpoint folder is a file": Case(folder_is_a_file,
                                        ["{dump}/notes.txt is a file", "--checkpoint.folder"]),
    "read-only checkpoint folder": Case(read_only_folder,
                                        ["{dump}/checkpoint is not writable", "permissions",
                                         "--checkpoint.load_only"]),
    "missing step": Case(args("--checkpoint.load_step", "7"),
                         ["--checkpoint.load_step=7", "step-7", "{dump}/checkpoint", "[5, 10]",
                          "pick one of them with --checkpoint.load_step"]),
    "truncated .distcp": Case(truncate_distcp, ["{dump}/checkpoint/step-10/__0_0.distcp", "truncated",
                                                "savepoint verify", "--checkpoint.load_step"]),
    "corrupt .metadata": Case(corrupt_metadata, ["{dump}/checkpoint/step-10/.metadata", "corrupt",
                                                 "savepoint verify", "--checkpoint.load_step"]),
    "empty step folder": Case(empty_step, ["--checkpoint.load_step=15",
                                           "{dump}/checkpoint/step-15 exists but is not committed",
                                           "[5, 10]", "drop the flag"]),
    "different flavor": Case(other_flavor, ["{dump}/checkpoint/step-10", "'tok_embeddings.weight'",
                                            "[2048, 256] in the checkpoint", "[2048, 128] in the model",
                                            "saved with --model.flavor debugmodel"]),
    # The final save runs out of disk: that save fails and the run exits 1; steps 5 and 10 stay.
    "disk full": Case(args("--training.steps", "12"),
                      ["saving step 12", "{dump}/checkpoint", "File too large", "earlier steps are intact",
                       "--checkpoint.keep_latest_k"], subprocess=True),
    "second writer": Case(second_writer, ["{dump}/checkpoint is in use by another job", "pid 4242 on host node-7",
                                          "--checkpoint.folder"]),
    # Not an error: SIGTERM mid-save lets the save finish, commits step 11 and exits 0; 5 and 10 untouched.
    "SIGTERM mid-save": Case(sigterm_mid_save, ["preempted at step 11: checkpoint step-11 committed"],
                             exit_code=0, new_steps=[11]),
}


def damaged(name: str, load_step: bool = True) -> Callable[[Path, pytest.MonkeyPatch], list[str]]:
    """Damage step-10 as ``hostile.<name>`` does; load it explicitly (train rows) or add nothing (command rows)."""
    def setup(dump: Path, mp: pytest.MonkeyPatch) -> list[str]:
        getattr(hostile, name)(dump / "checkpoint/step-10")
        return ["--checkpoint.load_step", "10"] if load_step else []

    return setup


def titan_folder(dump: Path, mp: pytest.MonkeyPatch) -> list[str]:
    hostile.as_torchtitan(dump / "checkpoint")
    return ["--checkpoint.require_checksums"]


# Rows by area, each area in its own table (merged into CASES below, in this order).
HOSTILE_READ_CASES: dict[str, Case] = {  # hostile .metadata / manifest / paths, every CLI command
    # Forgeries reseal the manifest (tests/test_hostile_metadata.py runs them through every command).
    "code-running .metadata, inspect": Case(
        hm.bad_input_hostile_metadata, ["{dump}/checkpoint/step-10/.metadata asks to load posix.system",
                                        "Nothing was executed"], command=["inspect", "{dump}/checkpoint/step-10"]),
    "code-running .metadata, inspect folder": Case(
        hm.bad_input_hostile_metadata, ["1 step(s) of {dump}/checkpoint cannot be read: step-10",
                                        "savepoint verify"], command=["inspect", "{dump}/checkpoint"]),
    "class-changing .metadata": Case(
        hm.bad_input_class_mutation, ["{dump}/checkpoint/step-10/.metadata asks to set the state of the class",
                                      "MetadataIndex", "Nothing was executed"]),
    "memo index 2**24 in .metadata": Case(
        hm.bad_input_memo_index, ["{dump}/checkpoint/step-10/.metadata is corrupt", "not DCP metadata",
                                  "--checkpoint.load_step"]),
    "code-running stored tensor": Case(
        hm.bad_input_hostile_tensor, ["'tok_embeddings.weight'", "{dump}/checkpoint/step-10/__0_0.distcp",
                                      "asks to load posix.system", "Nothing was executed"]),
    "manifest without layout.world_size, inspect": Case(
        hm.bad_input_no_world_size, ["1 step(s) of {dump}/checkpoint cannot be read: step-10"],
        command=["inspect", "{dump}/checkpoint"]),
    # Damaged manifests, paths and data files (tests/hostile.py; more in tests/test_hostile_checkpoint.py).
    "manifest nested 100,000 levels": Case(
        damaged("deep_manifest"), ["{dump}/checkpoint/step-10/manifest.json is corrupt", "nested more than 32 levels",
                                   "savepoint verify", "--checkpoint.load_step"]),
    "manifest checksums.files is a list, verify": Case(
        damaged("files_is_a_list", load_step=False), ["1 of 2 step(s) failed verification: step-10"],
        command=["verify", "{dump}/checkpoint"]),
    "manifest names /etc/shadow": Case(
        damaged("names_etc_shadow"), ["{dump}/checkpoint/step-10/manifest.json is corrupt", "'/etc/shadow'",
                                      "not a file of the step folder"]),
    "manifest segments overlap": Case(
        damaged("whole_file_segments"), ["{dump}/checkpoint/step-10/manifest.json is corrupt",
                                         "without gaps or overlaps"]),
    "manifest deleted": Case(
        damaged("manifest_deleted"), ["{dump}/checkpoint/step-10/manifest.json is missing",
                                      "step-5 in the same folder has one", "--checkpoint.load_step"]),
    "manifest is a folder": Case(
        damaged("manifest_is_a_folder"), ["{dump}/checkpoint/step-10/manifest.json is a folder"]),
    "checksums removed from the manifest": Case(
        damaged("checksums_deleted"), ["{dump}/checkpoint/step-10/manifest.json is corrupt: it has no checksums"]),
    ".metadata offset 2**40, to_hf": Case(
        damaged("offset_2_40", load_step=False), ["{dump}/checkpoint/step-10/__0_0.distcp is corrupt",
                                                  "at bytes [1099511627776,"],
        command=["convert", "to_hf", "{dump}/checkpoint/step-10", "{dump}/hf", "--model_flavor", "debugmodel"]),
    ".metadata shape [2**31, 2**31]": Case(
        damaged("huge_shape"), ["{dump}/checkpoint/step-10/.metadata is corrupt", "[2147483648, 2147483648]",
                                "are stored"]),
    ".metadata data file outside the step": Case(
        damaged("absolute_relative_path"), ["{dump}/checkpoint/step-10: the data file name",
                                            "points outside the folder"]),
    "TorchTitan folder, require_checksums": Case(
        titan_folder, ["{dump}/checkpoint/step-10 has no checksums", "--checkpoint.require_checksums"]),
}
def lock_symlink(dump: Path, mp: pytest.MonkeyPatch) -> list[str]:
    """``.savepoint.lock`` is a symlink to a file in the folder: the lock must not write through it."""
    (dump / "checkpoint/notes.txt").write_text("the user's notes\n")
    (dump / "checkpoint" / LOCK_NAME).symlink_to("notes.txt")
    return []


def lock_fifo(dump: Path, mp: pytest.MonkeyPatch) -> list[str]:
    os.mkfifo(dump / "checkpoint" / LOCK_NAME)
    return []


COMMIT_CASES: dict[str, Case] = {  # commit, lock, disk-full and launcher rows
    "lock file is a symlink": Case(lock_symlink, ["the lock file {dump}/checkpoint/.savepoint.lock is a symbolic link",
                                                  "not a regular file", "remove it"]),
    "lock file is a FIFO": Case(lock_fifo, ["the lock file {dump}/checkpoint/.savepoint.lock is a FIFO",
                                            "not a regular file", "remove it"]),
    # The async writer's niceness from the environment: checked when the writer is set up.
    "SAVEPOINT_WRITER_NICE not a number": Case(
        lambda dump, mp: (mp.setenv("SAVEPOINT_WRITER_NICE", "abc"), ["--checkpoint.async_mode", "async"])[1],
        ["SAVEPOINT_WRITER_NICE='abc' in the environment", "a whole number from 0", "to 19", "unset it"]),
    "SAVEPOINT_WRITER_NICE out of range": Case(
        lambda dump, mp: (mp.setenv("SAVEPOINT_WRITER_NICE", "-5"),
                          ["--checkpoint.async_mode", "async_with_pinned_mem"])[1],
        ["SAVEPOINT_WRITER_NICE='-5' in the environment", "a whole number from 0"]),
}


def titan_step(path: str, value: object) -> Callable[[Path, pytest.MonkeyPatch], list[str]]:
    """step-10 rewritten without a manifest (as TorchTitan writes it) with one value changed, alone in
    ``{dump}/titan`` so it loads unverified; the run resumes from that folder."""
    def setup(dump: Path, mp: pytest.MonkeyPatch) -> list[str]:
        from tests.test_loaded_values import craft_step, set_value

        craft_step(dump / "checkpoint/step-10", dump / "titan/step-10", set_value(path, value))
        return ["--checkpoint.folder", "titan", "--training.steps", "12"]

    return setup


def metrics_symlink(dump: Path, mp: pytest.MonkeyPatch) -> list[str]:
    (dump / "metrics.jsonl").unlink()
    (dump / "metrics.jsonl").symlink_to(dump / "checkpoint/step-10/.metadata")  # appending would damage step-10
    return []


LOADED_VALUE_CASES: dict[str, Case] = {  # values a Stateful restores, config values
    "negative train_state.step": Case(titan_step("train_state.step", -1_000_000_000),
                                      ["{dump}/titan/step-10/__0_0.distcp", "train_state.step is -1000000000",
                                       "an int >= 0", "nothing was restored"]),
    "huge dataloader.sample_index": Case(titan_step("dataloader.sample_index", 10**30),
                                         ["{dump}/titan/step-10/__0_0.distcp", "dataloader.sample_index",
                                          "below 2**63"]),
    "string lr_scheduler.last_epoch": Case(titan_step("lr_scheduler.last_epoch", "ten"),
                                           ["{dump}/titan/step-10", "lr_scheduler.last_epoch is 'ten' (str)"]),
    "AdamW beta1 5": Case(args("--optimizer.beta1", "5"), ["invalid configuration", "--optimizer.beta1", "[0, 1)"]),
    "AdamW eps -1": Case(args("--optimizer.eps", "-1"), ["--optimizer.eps must be finite and > 0"]),
    "seed past 64 bits": Case(args("--training.seed", str(10**23)), ["--training.seed must be between 0 and"]),
    "huge seq_len": Case(args("--training.seq_len", "100000000"),
                         ["--training.seq_len", "the longest context of --model.flavor debugmodel"]),
    "config file /dev/zero": Case(nothing, ["invalid configuration", "/dev/zero is a character device"],
                                  command=["check", "--job.config_file", "/dev/zero"]),
    "dump folder in /proc": Case(args("--job.dump_folder", "/proc/savepoint-x"),
                                 ["--job.dump_folder=/proc/savepoint-x: cannot create", "choose a folder"]),
    "metrics.jsonl symlink": Case(metrics_symlink, ["{dump}/metrics.jsonl is a symbolic link", "remove it"]),
    # Resumes at 10; step 11's lr of 3e29 blows the weights up, step 12's gradient norm is NaN: no step-12.
    "non-finite loss": Case(args("--training.steps", "12", "--optimizer.lr", "1e30", "--training.max_norm", "0"),
                            ["step 12: the gradient norm is nan", "saved nothing", "step-10"]),
}
def _hf_copy(dump: Path, damage: Callable[[Path], None]) -> list[str]:
    """Export step-10 as an HF folder ``{dump}/hf``, damage it, and start a new run from it."""
    from savepoint.convert import convert_to_hf

    convert_to_hf(dump / "checkpoint/step-10", dump / "hf", "debugmodel", progress=False)
    damage(dump / "hf")
    return ["--checkpoint.folder", "fresh", "--checkpoint.initial_load_in_hf",
            "--checkpoint.initial_load_path", str(dump / "hf")]


def _nan_norm(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.norm.weight"][0] = float("nan")
    save_file(tensors, str(folder / "model.safetensors"))


def _linked_tokenizer(dump: Path, mp: pytest.MonkeyPatch) -> list[str]:
    (dump / "assets").mkdir()
    (dump / "assets/tokenizer.json").symlink_to("/proc/self/environ")
    return []


HF_CASES: dict[str, Case] = {  # Hugging Face folders and exports
    "HF export, other --model_flavor than recorded": Case(
        nothing, ["--model_flavor 8B does not match {dump}/checkpoint/step-10", "trained with flavor debugmodel",
                  "drop --model_flavor"],
        command=["convert", "to_hf", "{dump}/checkpoint/step-10", "{dump}/out", "--model_flavor", "8B"]),
    "HF export, symlinked tokenizer file": Case(
        _linked_tokenizer, ["--hf_assets_path: {dump}/assets/tokenizer.json is a symbolic link", "cp -L"],
        command=["convert", "to_hf", "{dump}/checkpoint/step-10", "{dump}/out", "--hf_assets_path", "{dump}/assets"]),
    "HF initial load, config.json not JSON": Case(
        lambda dump, mp: _hf_copy(dump, lambda hf: (hf / "config.json").write_text("{not json")),
        ["{dump}/hf/config.json", "not JSON"]),
    "HF initial load, NaN weight": Case(
        lambda dump, mp: _hf_copy(dump, _nan_norm),
        ["{dump}/hf/model.safetensors", "'model.norm.weight' holds 1 non-finite values", "Re-download"]),
}

# `savepoint check` as run_train.sh runs it before launching, on debug_model.toml (the rows and their
# words are tests/test_pipeline_plan.py's, by the stage-split tests they go with).
PIPELINE_CASES: dict[str, Case] = {  # pipeline parallelism: refused before any process starts
    name: Case(nothing, expect, command=["check", "--job.config_file", str(CONFIG), "--job.dump_folder", "{dump}",
                                         *argv], world_size=ngpu)
    for name, (ngpu, argv, expect) in pipeline_rows.REFUSED_BEFORE_LAUNCH.items()
}

for _table in (HOSTILE_READ_CASES, COMMIT_CASES, LOADED_VALUE_CASES, HF_CASES, PIPELINE_CASES):
    CASES.update(_table)


# ---- the harness --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A dump folder with committed full steps 5 and 10 (debug model, FAST_ARGS), built once."""
    from savepoint.train import Trainer

    dump = tmp_path_factory.mktemp("bad_input") / "base"
    trainer = Trainer(make_config(dump, *STEPS))
    trainer.train()
    trainer.checkpointer.close()
    assert CheckpointFolder(dump / "checkpoint").committed_steps() == [5, 10]
    return dump


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` (the lock file aside) -> its SHA-256 (folders: 'dir')."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.name == LOCK_NAME:
            continue
        rel = str(path.relative_to(root))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def run_subprocess(argv: list[str]) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SAVEPOINT_DEBUG", "RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-c", DISK_FULL_DRIVER, *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, base_run, tmp_path, capsys, monkeypatch):
    case = CASES[name]
    monkeypatch.delenv("SAVEPOINT_DEBUG", raising=False)
    dump = tmp_path / "run"
    shutil.copytree(base_run, dump)
    root = dump / "checkpoint"
    config = case.config(dump) if case.config else CONFIG
    if case.world_size is not None:
        monkeypatch.setenv("SAVEPOINT_WORLD_SIZE", str(case.world_size))
    extra = case.setup(dump, monkeypatch)
    before = snapshot(root)
    argv = ["train", "--job.config_file", str(config), "--job.dump_folder", str(dump), *FAST_ARGS, *STEPS, *extra]
    if case.command is not None:
        argv = [a.format(dump=dump) for a in case.command] + extra
    try:
        code, out, err = run_subprocess(argv) if case.subprocess else run_cli(argv, capsys)
    finally:
        if _HELD is not None:
            _HELD.release()
        if root.is_dir():
            root.chmod(0o755)
    after = snapshot(root)

    if case.exit_code == 0:
        assert code == 0, err
        assert "Traceback" not in err and "error" not in err, err
        for want in case.expect:
            assert want in out, out[-3000:]
        steps = CheckpointFolder(root).committed_steps()
        assert steps == sorted([5, 10, *case.new_steps])
        for step in case.new_steps:  # committed, and its checksums match
            report = verify_step(root / f"step-{step}")
            assert report.ok and report.verified, report.problems
        after = {k: v for k, v in after.items() if not any(k.startswith(f"step-{s}") for s in case.new_steps)}
        assert after == before, "an existing checkpoint changed"
        BAD_INPUT_MESSAGES[name] = f"(exit 0) steps now {steps}"
        return

    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    line = lines[0]
    assert line.startswith("error: ") and "Traceback" not in err, err
    assert code == case.exit_code, err
    for want in case.expect:
        assert want.format(dump=dump) in line, f"{want.format(dump=dump)!r} not in {line!r}"
    assert after == before, "an existing checkpoint changed"
    assert CheckpointFolder(root).committed_steps() == [5, 10]
    BAD_INPUT_MESSAGES[name] = line.replace(str(dump), "<dump>")


def teardown_module(module) -> None:
    report = os.environ.get("SAVEPOINT_BAD_INPUT_REPORT")
    if report:
        Path(report).write_text(json.dumps(BAD_INPUT_MESSAGES, indent=2) + "\n")
