"""The job every kill trial runs, the reference run's losses and timeline, and one trial's checks and outcome."""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from savepoint.durable import MANIFEST
from tests.trials.common import job_argv
from tests.trials.folder import compare_losses, read_folder, read_losses, verify_folder

MODES = ("disabled", "async", "async_with_pinned_mem")
RUN_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class JobSpec:
    """The training job every trial runs (the same for the reference run and the trials)."""

    mode: str = "disabled"
    steps: int = 6
    interval: int = 1
    keep: int = 2
    world_size: int = 1
    pp: int = 1  # pipeline-parallel degree (dividing world_size); data parallelism takes the rest
    pp_schedule: str = "Interleaved1F1B"
    max_restarts: int = 0  # torchrun's --max-restarts (the launcher targets)
    memory_interval: int = 0  # --checkpoint.memory_interval (0: no in-memory tier)

    def argv(self, dump_folder: Path) -> list[str]:
        pipeline = () if self.pp == 1 else (
            "--parallelism.pipeline_parallel_degree", str(self.pp),
            "--parallelism.pipeline_parallel_schedule", self.pp_schedule)
        memory = () if not self.memory_interval else (
            "--checkpoint.memory_interval", str(self.memory_interval),
            "--checkpoint.memory_folder", str(memory_folder(dump_folder)))
        return job_argv(dump_folder, steps=self.steps, keep=self.keep, warmup_steps=2, interval=self.interval,
                        extra=("--lr_scheduler.decay_ratio", "0.5", "--checkpoint.async_mode", self.mode, *pipeline,
                               *memory))

    def layout_problem(self, step_dir: Path) -> str | None:
        """Why the layout ``step_dir``'s manifest records is not this job's (world size, PP degree), or None."""
        layout = json.loads((step_dir / MANIFEST).read_text())["layout"]
        pp = layout.get("pipeline_parallel_degree", 1)
        if layout["world_size"] == self.world_size and pp == self.pp:
            return None
        return f"{step_dir} was saved at world size {layout['world_size']}, PP {pp}; the job asks for " \
               f"{self.world_size}, PP {self.pp}"

    def saved_steps(self) -> list[int]:
        """The steps an uninterrupted run saves, ascending (every interval, and the last)."""
        return sorted({s for s in range(1, self.steps + 1) if s % self.interval == 0} | {self.steps})

    def final_steps(self) -> list[int]:
        """What a finished run's folder holds: the newest ``keep`` saved steps."""
        saved = self.saved_steps()
        return saved[-self.keep:] if self.keep > 0 else saved


def checkpoint_root(dump: Path) -> Path:
    return dump / "checkpoint"


MEMORY_ROOT = Path("/dev/shm/savepoint-trials")


def memory_folder(dump: Path) -> Path:
    """The job's ``--checkpoint.memory_folder`` (in RAM, one per job folder; removed with the trial)."""
    return MEMORY_ROOT / dump.name


@dataclass
class Reference:
    """The reference run's losses, and the run's timeline, kept up to date as trials run.

    The timeline (start-up, then training) starts as the reference run's and then follows the
    medians of the latest runs: on a shared machine a run's speed swings several-fold, and a fixed
    timeline would put many kills after the run ended (or all of them early).
    """

    losses: dict[int, float]
    wall_s: float  # start to exit
    startup_s0: float  # start to "loaded" (built, folder prepared, checkpoint looked for)
    steps: int = 1
    startups: deque = field(default_factory=lambda: deque(maxlen=15))
    step_times: deque = field(default_factory=lambda: deque(maxlen=15))  # training seconds per step

    def __post_init__(self) -> None:
        self.startups.append(self.startup_s0)
        self.step_times.append((self.wall_s - self.startup_s0) / self.steps)

    @property
    def startup_s(self) -> float:
        return statistics.median(self.startups)

    @property
    def train_s(self) -> float:
        return statistics.median(self.step_times) * self.steps

    def timeline_s(self) -> float:
        return self.startup_s + self.train_s

    def observe(self, run: Any, dump: Path, loaded: Any, finished: bool) -> None:
        """Add a forked run's start-up and step times (``run``: its ``run_id``, ``started``, ``ended``)."""
        path = dump / f"run{run.run_id}.loaded.json"
        if not path.is_file():
            return
        loaded_at = json.loads(path.read_text())["t"]
        self.startups.append(loaded_at - run.started)
        first = (loaded or 0) + 1
        if finished and run.ended is not None and first <= self.steps:
            self.step_times.append((run.ended - loaded_at) / (self.steps - first + 1))


def reference_losses(spec: JobSpec, dump: Path, what: str) -> dict[int, float]:
    """The losses an uninterrupted run logged in ``dump``, after checking it logged every step and left the
    folder a finished run leaves.

    Raises:
        RuntimeError: it did not (nothing the trials check could be trusted).
    """
    records, _ = read_losses(dump)
    losses = dict(records)
    if sorted(losses) != list(range(1, spec.steps + 1)):
        raise RuntimeError(f"{what} ({spec.mode}) logged steps {sorted(losses)}")
    state = read_folder(checkpoint_root(dump))
    problems = verify_folder(checkpoint_root(dump), state)
    if problems or state.committed != spec.final_steps():
        raise RuntimeError(f"{what} ({spec.mode}): folder {state.committed}, problems {problems}")
    layout = spec.layout_problem(checkpoint_root(dump) / f"step-{state.committed[-1]}")
    if layout:
        raise RuntimeError(f"{what} ({spec.mode}): {layout}")
    return losses


@dataclass
class TrialResult:
    trial: int
    mode: str
    kills: list[tuple[float, str, int | None]] = field(default_factory=list)  # (delay, phase, expected resume)
    outcome: str = "ok"  # ok | corrupt | unloadable | wrong_step | mismatch | leftover | survivor | harness
    problems: list[str] = field(default_factory=list)
    completed_before_kill: bool = False
    wall_s: float = 0.0
    # --target launcher: per kill {how, phase, survivors, gone_s}; per restart that ran to the end "ok" / "exit N"
    launcher_kills: list[dict] = field(default_factory=list)
    restarts: list[str] = field(default_factory=list)
    dump: Path | None = field(default=None, repr=False)  # the trial's job folder, while it runs
    started: float = field(default_factory=time.monotonic, repr=False)

    @classmethod
    def begin(cls, trial: int, spec: JobSpec, workdir: Path, kind: str = "") -> TrialResult:
        """A trial of ``spec`` starting now, in a fresh folder under ``workdir``."""
        return cls(trial, spec.mode, dump=Path(tempfile.mkdtemp(prefix=f"trial{trial}-{kind}{spec.mode}-",
                                                                 dir=workdir)))

    def fail(self, outcome: str, problem: str) -> None:
        if self.outcome == "ok":
            self.outcome = outcome
        self.problems.append(problem)

    def check_losses(self, dump: Path, offset: int, ref: Reference, run_id: int) -> tuple[list, int]:
        """The losses run ``run_id`` appended from ``offset`` on (all must equal the reference's), and the new end."""
        records, offset = read_losses(dump, offset)
        for problem in compare_losses(records, ref.losses):
            self.fail("mismatch", f"run {run_id}: {problem}")
        return records, offset

    def check_first_step(self, records: list, run_id: int) -> None:
        """The restart's first logged step follows the newest step committed at the last kill."""
        expected = self.kills[-1][2]
        if records and records[0][0] != (expected or 0) + 1:
            self.fail("wrong_step", f"run {run_id}: first step {records[0][0]} after loading {expected}")

    def check_after_kill(self, root: Path, segment: int, delay: float, phase: str) -> None:
        """Record a kill; every step visible right after it must be complete and verify."""
        state = read_folder(root)
        self.kills.append((delay, phase, state.expected_resume))
        for problem in verify_folder(root, state):
            self.fail("corrupt", f"after kill {segment + 1} ({phase}): {problem}")

    def check_finished(self, root: Path, spec: JobSpec) -> None:
        """The folder of the finished job is the one an uninterrupted run leaves."""
        state = read_folder(root)
        for problem in verify_folder(root, state):
            self.fail("corrupt", f"at the end: {problem}")
        if state.committed != spec.final_steps() or state.hidden:
            self.fail("leftover", f"at the end: steps {state.committed} (expected {spec.final_steps()}), "
                                  f"hidden {state.hidden}")

    def close(self, keep_failed: bool) -> TrialResult:
        """Stop the clock; remove the trial's folder unless it failed and ``keep_failed``."""
        self.wall_s = time.monotonic() - self.started
        shutil.rmtree(memory_folder(self.dump), ignore_errors=True)  # RAM: never kept
        try:
            MEMORY_ROOT.rmdir()  # once no trial uses it
        except OSError:
            pass
        if self.outcome == "ok" or not keep_failed:
            shutil.rmtree(self.dump, ignore_errors=True)
        else:
            self.problems.append(f"kept {self.dump}")
        return self

    def as_json(self) -> dict:
        return {"trial": self.trial, "mode": self.mode, "kills": self.kills, "outcome": self.outcome,
                "problems": self.problems, "completed_before_kill": self.completed_before_kill,
                "wall_s": self.wall_s, "launcher_kills": self.launcher_kills, "restarts": self.restarts}

    @classmethod
    def from_json(cls, d: dict) -> TrialResult:
        return cls(d["trial"], d["mode"], [tuple(k) for k in d["kills"]], d["outcome"], d["problems"],
                   d["completed_before_kill"], d["wall_s"], d.get("launcher_kills", []), d.get("restarts", []))
