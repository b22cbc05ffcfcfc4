"""Corruption trials: damage one committed step at random and check that savepoint notices, every time.

Run from the repository root with the project's interpreter (``scripts/bootstrap.sh`` makes it)::

    .venv/bin/python -m tests.trials.corruption --trials 1000 --seed 0
    .venv/bin/python -m tests.trials.corruption --trials 200 --kind truncate --fresh-trainers

``--help`` lists every option. The exit status is 1 if any damage went unnoticed; ``--json FILE``
also writes the counts. ``tests/test_corruption_trials.py`` runs a small campaign (the full one
under the ``slow`` marker).

One training job (``debugmodel``, tiny batches, full saves of step 1 and step 2) is run once. Each
trial then copies step-2 (hard links for the files it leaves alone, a real copy of the one it
damages), and damages one file chosen at random (``.metadata``, the ``.distcp`` shard or
``manifest.json``), drawn from the seeded generator:

- ``flip``: one random bit at a random byte offset;
- ``truncate``: cut to a random length in ``[0, size)``.

and checks, all in this process:

a. ``verify_step(step-2)`` reports it (``ok`` False), and so does ``savepoint verify step-2`` (exit 1);
b. a Trainer built with ``--checkpoint.load_step 2`` raises a savepoint ``CheckpointError`` on load
   (if the load succeeds anyway, the loaded state is compared with the intact step-2's to tell a
   harmless miss from silent corruption);
c. a Trainer that auto-resumes (corrupt step-2, intact step-1) falls back to step 1, logs a warning
   that names the corruption, and its model and optimizer are bit-identical to a clean load of step 1.

Prints detected/total for each check (the goal: all of them). A control trial on an undamaged copy
runs first: every check must pass the other way on it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from savepoint import cli
from savepoint.checkpoint import CheckpointManager
from savepoint.checkpoint.verify import verify_step
from savepoint.errors import CheckpointError
from savepoint.job import parse_args
from savepoint.train import Trainer
from tests.trials.common import finish, quiet_log
from tests.trials.common import job_argv as _job_argv

KINDS = ("flip", "truncate")
CORRUPT_STEP, GOOD_STEP = 2, 1


def job_argv(dump: Path, *extra: str) -> list[str]:
    """The job: 2 steps, both saved in full and kept."""
    return _job_argv(dump, steps=2, keep=0, warmup_steps=1, extra=extra)


def state_tensors(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Model parameters and optimizer tensors (by parameter name), cloned."""
    out = {f"model.{k}": v.detach().clone() for k, v in trainer.model.state_dict().items()}
    names = {p: n for n, p in trainer.model.named_parameters()}
    for param, state in trainer.optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out[f"optimizer.{names[param]}.{key}"] = value.detach().clone()
    out["train_state"] = torch.tensor([trainer.train_state.step, trainer.train_state.ntokens_seen])
    out["data_loader"] = torch.tensor([trainer.dataloader.sample_index])
    out["lr_scheduler"] = torch.tensor([trainer.lr_scheduler.last_epoch])
    return out


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Pristine:
    """The job's intact folder and what a clean load of each step gives."""

    dump: Path
    files: list[str]  # the files of the step that trials damage
    states: dict[int, dict[str, torch.Tensor]]

    @property
    def root(self) -> Path:
        return self.dump / "checkpoint"


def make_pristine(work: Path) -> Pristine:
    dump = work / "pristine"
    trainer = Trainer(parse_args(job_argv(dump), environ={}))
    trainer.train()
    trainer.checkpointer.close()
    root = dump / "checkpoint"
    states = {}
    for step in (GOOD_STEP, CORRUPT_STEP):
        report = verify_step(root / f"step-{step}")
        if not report.ok:
            raise RuntimeError(f"the pristine step-{step} does not verify: {report.problems}")
        loader = Trainer(parse_args(job_argv(dump, "--checkpoint.load_step", str(step)), environ={}))
        try:
            if loader.load_checkpoint() != step:
                raise RuntimeError(f"the pristine step-{step} did not load")
            states[step] = state_tensors(loader)
        finally:
            loader.checkpointer.close()
    files = sorted(p.name for p in (root / f"step-{CORRUPT_STEP}").iterdir() if p.is_file())
    return Pristine(dump, files, states)


@dataclass
class Damage:
    file: str
    kind: str
    offset: int  # flip: byte offset; truncate: new length
    bit: int = 0
    size: int = 0

    def describe(self) -> str:
        if self.kind == "flip":
            return f"flip bit {self.bit} of byte {self.offset} of {self.file} ({self.size} B)"
        return f"truncate {self.file} ({self.size} B) to {self.offset} B"


def draw_damage(rng: random.Random, pristine: Pristine, kinds: tuple[str, ...] = KINDS) -> Damage:
    name = rng.choice(pristine.files)
    size = (pristine.root / f"step-{CORRUPT_STEP}" / name).stat().st_size
    kind = rng.choice(kinds)
    offset = rng.randrange(size)
    return Damage(name, kind, offset, rng.randrange(8) if kind == "flip" else 0, size)


def build_trial_folder(pristine: Pristine, trial_dump: Path, damage: Damage) -> Path:
    """``trial_dump/checkpoint`` = intact step-1 and a step-2 with ``damage`` (hard links + one real copy)."""
    shutil.rmtree(trial_dump, ignore_errors=True)
    root = trial_dump / "checkpoint"
    for step in (GOOD_STEP, CORRUPT_STEP):
        src, dst = pristine.root / f"step-{step}", root / f"step-{step}"
        dst.mkdir(parents=True)
        for path in src.iterdir():
            if step == CORRUPT_STEP and path.name == damage.file:
                shutil.copyfile(path, dst / path.name)
            else:
                os.link(path, dst / path.name)
    target = root / f"step-{CORRUPT_STEP}" / damage.file
    with open(target, "r+b") as f:
        if damage.kind == "flip":
            f.seek(damage.offset)
            byte = f.read(1)[0]
            f.seek(damage.offset)
            f.write(bytes([byte ^ (1 << damage.bit)]))
        elif damage.kind == "truncate":
            f.truncate(damage.offset)
    return root


@dataclass
class TrialResult:
    trial: int
    damage: Damage
    verify: bool = False  # verify_step reported it
    cli: bool = False  # `savepoint verify` exited 1
    load: bool = False  # explicit load_step raised CheckpointError
    fallback: bool = False  # auto-resume fell back to step 1, warned, and holds step 1's exact state
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.verify and self.cli and self.load and self.fallback


def run_cli_verify(path: Path) -> int:
    """``savepoint verify PATH`` in process; returns its exit code."""
    log = logging.getLogger("savepoint")
    handlers, level = list(log.handlers), log.level
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return cli.main(["verify", str(path)])
    finally:
        for h in list(log.handlers):
            if h not in handlers:
                log.removeHandler(h)
        log.setLevel(level)


def run_trial(trial: int, pristine: Pristine, damage: Damage, trial_dump: Path, capture: _Capture,
              loaders: Loaders) -> TrialResult:
    result = TrialResult(trial, damage)
    root = build_trial_folder(pristine, trial_dump, damage)
    step_dir = root / f"step-{CORRUPT_STEP}"

    report = verify_step(step_dir)
    result.verify = not report.ok
    if report.ok:
        result.notes.append("verify_step: ok")
    code = run_cli_verify(step_dir)
    result.cli = code == 1
    if code != 1:
        result.notes.append(f"savepoint verify exited {code}")

    # (b) an explicit load of the damaged step must fail with a CheckpointError.
    trainer, manager = loaders.open(trial_dump, "--checkpoint.load_step", str(CORRUPT_STEP))
    try:
        manager.load(step=CORRUPT_STEP)
    except CheckpointError:
        result.load = True
    except Exception as e:  # noqa: BLE001 - a non-savepoint error is a finding
        result.notes.append(f"explicit load raised {type(e).__name__} (not CheckpointError): {e}")
    else:
        harmless = same_state(state_tensors(trainer), pristine.states[CORRUPT_STEP])
        result.notes.append("explicit load succeeded" + (" (state equals the intact step's)" if harmless
                                                          else " with a DIFFERENT state: silent corruption"))
    finally:
        manager.close()

    # (c) auto-resume must fall back to the intact step, warn, and restore exactly that step.
    capture.records.clear()
    trainer, manager = loaders.open(trial_dump)
    try:
        loaded = manager.load(step=-1)
    except Exception as e:  # noqa: BLE001
        result.notes.append(f"auto-resume raised {type(e).__name__}: {e}")
    else:
        warned = any("corrupt" in r.getMessage().lower() for r in capture.records)
        exact = loaded in pristine.states and same_state(state_tensors(trainer), pristine.states[loaded])
        result.fallback = loaded == GOOD_STEP and warned and exact
        if not result.fallback:
            result.notes.append(f"auto-resume loaded step {loaded}, warned={warned}, exact state of that step={exact}")
    finally:
        manager.close()
    return result


def control(pristine: Pristine, trial_dump: Path, capture: _Capture, loaders: Loaders) -> None:
    """The checks on an undamaged copy must all pass the other way: proof they can tell the two apart.

    Raises:
        RuntimeError: an intact step fails a check (a harness or savepoint bug: nothing can be concluded).
    """
    result = run_trial(-1, pristine, Damage(pristine.files[0], "none", 0), trial_dump, capture, loaders)
    notes = " | ".join(result.notes)
    if result.verify or result.cli or result.load or "(state equals the intact step's)" not in notes \
            or "auto-resume loaded step 2, warned=False" not in notes:
        raise RuntimeError(f"control trial on an intact copy went wrong: {result} {notes}")


class Loaders:
    """Checkpoint managers over a trial's folder, as a Trainer builds them.

    ``fresh=True`` builds a whole new Trainer for every load (the job's own path, ~0.3 s each).
    By default one Trainer's model, optimizer, schedule, data loader and train state are reused, with
    a new ``CheckpointManager`` (same arguments the Trainer gives it) per load; before each load every
    model and optimizer tensor is set to NaN and the counters to -1, so a load that fails to restore
    any of them cannot pass the exact-state check on what an earlier trial left there.
    """

    def __init__(self, scratch: Path, fresh: bool = False):
        self.fresh = fresh
        self.template: Trainer | None = None
        if not fresh:
            self.template = Trainer(parse_args(job_argv(scratch), environ={}))
            self.template.checkpointer.close()

    def open(self, dump: Path, *overrides: str) -> tuple[Trainer, CheckpointManager]:
        cfg = parse_args(job_argv(dump, *overrides), environ={})
        if self.fresh:
            trainer = Trainer(cfg)
            return trainer, trainer.checkpointer
        trainer = self.template
        assert trainer is not None
        scramble(trainer)
        old = trainer.checkpointer
        manager = CheckpointManager(cfg.checkpoint, cfg.job.dump_folder, old.model_state.model, old.states,
                                    old.job_config, old.layout, old.column_tiled, old.hf.adapter, old.hf.assets_path)
        return trainer, manager


@torch.no_grad()
def scramble(trainer: Trainer) -> None:
    for tensor in state_views(trainer):
        if torch.is_floating_point(tensor):
            tensor.fill_(float("nan"))
        else:
            tensor.fill_(-1)
    trainer.train_state.step = -1
    trainer.train_state.ntokens_seen = -1


def state_views(trainer: Trainer) -> list[torch.Tensor]:
    views = list(trainer.model.state_dict().values())
    for state in trainer.optimizer.state.values():
        views += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return views


@dataclass
class Summary:
    results: list[TrialResult]
    wall_s: float

    def report(self) -> str:
        n = len(self.results)
        lines = [f"corruption trials: {n} trials in {self.wall_s:.1f} s ({self.wall_s / max(n, 1):.3f} s/trial)"]
        for check, what in (("verify", "verify_step reports it"), ("cli", "`savepoint verify` exits 1"),
                            ("load", "explicit --checkpoint.load_step raises CheckpointError"),
                            ("fallback", "auto-resume falls back to step 1 with a warning, exact state")):
            got = sum(getattr(r, check) for r in self.results)
            lines.append(f"  {what:62s} {got:5d}/{n} ({100 * got / max(n, 1):.1f} %)")
        by = Counter((r.damage.kind, r.damage.file) for r in self.results)
        missed = Counter((r.damage.kind, r.damage.file) for r in self.results if not r.ok)
        lines.append("damage: " + ", ".join(f"{k} {f} {c} (missed {missed.get((k, f), 0)})"
                                            for (k, f), c in sorted(by.items())))
        for r in [r for r in self.results if not r.ok][:20]:
            lines.append(f"MISSED trial {r.trial}: {r.damage.describe()}: {' | '.join(r.notes)[:600]}")
        return "\n".join(lines)

    def counts(self) -> dict[str, int]:
        return {check: sum(getattr(r, check) for r in self.results) for check in ("verify", "cli", "load", "fallback")}

    def as_json(self) -> dict:
        return {"trials": len(self.results), "detected": self.counts(), "missed": len(self.missed),
                "wall_s": self.wall_s,
                "missed_trials": [{"trial": r.trial, "damage": r.damage.describe(), "notes": r.notes}
                                  for r in self.missed]}

    @property
    def missed(self) -> list[TrialResult]:
        return [r for r in self.results if not r.ok]


def run_trials(trials: int, seed: int = 0, workdir: str | Path | None = None, progress: bool = False,
               kinds: tuple[str, ...] = KINDS, fresh_trainers: bool = False) -> Summary:
    started = time.monotonic()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="corruption-trials-", dir=workdir))
    capture = _Capture()
    results: list[TrialResult] = []
    try:
        # Warnings go to ``capture`` only: the fallback's loud error would otherwise flood the console.
        with quiet_log(logging.WARNING, capture), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pristine = make_pristine(work)
            loaders = Loaders(work / "template", fresh=fresh_trainers)
            control(pristine, work / "trial", capture, loaders)
            rng = random.Random(seed)
            for i in range(trials):
                damage = draw_damage(rng, pristine, kinds)
                result = run_trial(i, pristine, damage, work / "trial", capture, loaders)
                results.append(result)
                if progress and (not result.ok or (i + 1) % 100 == 0):
                    print(f"[{time.monotonic() - started:7.1f} s] {i + 1}/{trials}, missed "
                          f"{sum(not r.ok for r in results)}"
                          + (f"; trial {i}: {damage.describe()}: {' | '.join(result.notes)[:400]}"
                             if not result.ok else ""), flush=True)
            for step in (GOOD_STEP, CORRUPT_STEP):  # hard links: make sure no trial wrote through them
                if not verify_step(pristine.root / f"step-{step}").ok:
                    raise RuntimeError(f"the pristine step-{step} was damaged during the trials (harness bug)")
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(work, ignore_errors=True)
    return Summary(results, time.monotonic() - started)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.trials.corruption", description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kind", choices=(*KINDS, "all"), default="all")
    p.add_argument("--workdir", default=None, help="where the trial folders go (default: the temp folder)")
    p.add_argument("--json", default=None, help="also write the counts as JSON to this file")
    p.add_argument("--fresh-trainers", action="store_true",
                   help="build a new Trainer for every load (slower) instead of a new CheckpointManager")
    args = p.parse_args(argv)
    kinds = KINDS if args.kind == "all" else (args.kind,)
    summary = run_trials(args.trials, args.seed, args.workdir, progress=True, kinds=kinds,
                         fresh_trainers=args.fresh_trainers)
    return finish(summary.report(), summary.as_json(), args.json, bool(summary.missed))


if __name__ == "__main__":
    sys.exit(main())
