"""Kill trials: SIGKILL a training job at a random instant, restart it, and check the checkpoints held.

    .venv/bin/python benchmarks/kill_trials.py --trials 1000 --seed 0 --mode all          # ws=1
    .venv/bin/python benchmarks/kill_trials.py --trials 60 --seed 0 --mode all --world-size 2
    .venv/bin/python benchmarks/kill_trials.py --trials 30 --target launcher --world-size 2 --mode all

``--target launcher`` kills the launcher (torchrun, as ``./run_train.sh`` runs it) instead of the
job's process group; see "launcher kills" below.

Each trial trains the ``debugmodel`` (tiny batches, a checkpoint every ``--interval`` steps,
``keep_latest_k=2`` so retention deletes steps, full final save) in a fresh folder, kills the whole
job (its process group: trainer ranks, writer threads and writer processes) with SIGKILL at an
instant drawn uniformly over the timeline of an uninterrupted reference run (start-up, then
training; see ``run_until``), so kills land during start-up (including the removal of leftovers
and the load), training steps, staging, DCP writes and fsyncs, ``.metadata``, the manifest, the
rename and retention. Then it restarts the job (auto-resume) and lets it run to the end, and checks:

a. the restart loaded the newest committed step that was in the folder right after the kill
   (``step-N`` folders holding ``.metadata``; a ``.step-N.replaced`` whose ``step-N`` is missing
   counts too, since the protocol restores it);
b. every loss the restarted run logged is bit-identical to the loss of an uninterrupted reference
   run at that step (and so is every loss the killed run logged before it died);
c. every ``step-N`` visible right after the kill, and at the end, is complete and verifies
   (``savepoint.checkpoint.integrity.verify_step`` when that module exists; otherwise the
   fallback: ``.metadata`` unpickles and every file of the manifest is there at its size), and the
   finished job's folder holds exactly the newest ``keep_latest_k`` saved steps and no leftovers.

Speed: the harness imports torch and savepoint once and forks one child per run (no torch compute
runs in the parent before a fork, so the children start with a clean thread pool). A trial costs
about one uninterrupted run plus one start-up.

With ``--kills-per-trial K`` a trial kills the job K times in a row (each restart is checked like
the first) before the last restart runs to the end.

World size 2 forks two ranks per run, which join a gloo process group by environment variables
(``MASTER_ADDR``/``MASTER_PORT`` on a free port, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and share
one process group id, so one ``killpg`` kills the whole job.

The phase a kill landed in is read off the folder right after the kill (see ``classify_phase``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Imported once in the harness process, before any fork. Nothing here runs torch compute.
import torch  # noqa: E402

from savepoint.config import parse_args  # noqa: E402
from savepoint.train import Trainer  # noqa: E402

MODES = ("disabled", "async", "async_with_pinned_mem")
STEP_PREFIX = "step-"
CONFIG_FILE = ROOT / "configs" / "debug_model.toml"
RUN_TIMEOUT_S = 180.0


# ---- the job ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobSpec:
    """The training job every trial runs (the same for the reference run and the trials)."""

    mode: str = "disabled"
    steps: int = 6
    interval: int = 1
    keep: int = 2
    world_size: int = 1
    seq_len: int = 32
    batch: int = 2

    def argv(self, dump_folder: Path) -> list[str]:
        return [
            "--job.config_file", str(CONFIG_FILE), "--job.dump_folder", str(dump_folder),
            "--training.seq_len", str(self.seq_len), "--training.local_batch_size", str(self.batch),
            "--training.steps", str(self.steps),
            "--lr_scheduler.warmup_steps", "2", "--lr_scheduler.decay_ratio", "0.5",
            "--checkpoint.enable", "--checkpoint.interval", str(self.interval),
            "--checkpoint.keep_latest_k", str(self.keep), "--checkpoint.no_last_save_model_only",
            "--checkpoint.async_mode", self.mode, "--metrics.log_freq", "1",
        ]

    def saved_steps(self) -> list[int]:
        """The steps an uninterrupted run saves, ascending (every interval, and the last)."""
        return sorted({s for s in range(1, self.steps + 1) if s % self.interval == 0} | {self.steps})

    def final_steps(self) -> list[int]:
        """What a finished run's folder holds: the newest ``keep`` saved steps."""
        saved = self.saved_steps()
        return saved[-self.keep:] if self.keep > 0 else saved


def checkpoint_root(dump: Path) -> Path:
    return dump / "checkpoint"


# ---- the child (one rank of one run) -----------------------------------------------------------


def _child_main(spec: JobSpec, dump: Path, run_id: int, rank: int, port: int | None, pgid: int) -> None:
    """Body of a forked child: one rank of one run. Never returns."""
    code = 1
    try:
        try:
            os.setpgid(0, pgid or 0)
        except OSError:
            pass  # the parent set it already
        if spec.world_size > 1:
            os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                               "LOCAL_RANK": str(rank), "WORLD_SIZE": str(spec.world_size),
                               "LOCAL_WORLD_SIZE": str(spec.world_size)})
        warnings.filterwarnings("ignore")
        torch.set_num_threads(1)
        log = logging.getLogger("savepoint")
        for handler in list(log.handlers):
            log.removeHandler(handler)
        handler = logging.FileHandler(dump / f"run{run_id}.rank{rank}.log")
        handler.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s",
                                               datefmt="%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
        trainer = Trainer(parse_args(spec.argv(dump), environ={}))
        loaded = trainer.load_checkpoint()
        if rank == 0:
            _write_json(dump / f"run{run_id}.loaded.json", {"loaded": loaded, "t": time.monotonic()})
        trainer.train()
        trainer.checkpointer.close()
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        code = 0
    except BaseException:
        try:
            (dump / f"run{run_id}.rank{rank}.error").write_text(traceback.format_exc())
        except OSError:
            pass
    finally:
        logging.shutdown()
        os._exit(code)


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Run:
    """One started run: its ranks (forked children) in one process group."""

    run_id: int
    pids: list[int]
    pgid: int
    started: float
    status: dict[int, int] = field(default_factory=dict)  # pid -> wait status
    ended: float | None = None  # when the last rank was reaped

    def poll(self) -> bool:
        """Reap ranks that exited; True when all have."""
        for pid in self.pids:
            if pid in self.status:
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                self.status[pid] = status
        if len(self.status) == len(self.pids):
            self.ended = self.ended or time.monotonic()
            return True
        return False

    def wait(self, timeout: float) -> bool:
        """Wait until every rank exited, or ``timeout``; True if they did."""
        deadline = time.monotonic() + timeout
        delay = 0.001
        while not self.poll():
            if time.monotonic() > deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
        return True

    def kill(self) -> None:
        """SIGKILL the whole job (every process in its group) and reap the ranks."""
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in self.pids:
            if pid not in self.status:
                self.status[pid] = os.waitpid(pid, 0)[1]
        # Writer processes the ranks started are in the group too; they were killed with it and are
        # reaped by init. Wait until the group is empty so the next run never races with them.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.killpg(self.pgid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.002)

    def exit_codes(self) -> list[int | None]:
        return [os.waitstatus_to_exitcode(self.status[p]) if p in self.status else None for p in self.pids]

    def ok(self) -> bool:
        return len(self.status) == len(self.pids) and all(c == 0 for c in self.exit_codes())


def start_run(spec: JobSpec, dump: Path, run_id: int) -> Run:
    """Fork the ranks of one run; they train ``spec`` in ``dump`` (auto-resuming) to the end."""
    dump.mkdir(parents=True, exist_ok=True)
    port = _free_port() if spec.world_size > 1 else None
    pids: list[int] = []
    pgid = 0
    sys.stdout.flush()
    sys.stderr.flush()
    for rank in range(spec.world_size):
        pid = os.fork()
        if pid == 0:
            _child_main(spec, dump, run_id, rank, port, pgid)
        if pgid == 0:
            pgid = pid
        try:
            os.setpgid(pid, pgid)
        except OSError:
            pass  # the child set it already (or has exited)
        pids.append(pid)
    return Run(run_id, pids, pgid, time.monotonic())


def run_error(dump: Path, run_id: int) -> str:
    msgs = [p.read_text().strip().splitlines()[-1] for p in sorted(dump.glob(f"run{run_id}.rank*.error"))]
    return "; ".join(msgs) or "no error file"


# ---- the folder --------------------------------------------------------------------------------


def _step_of(name: str) -> int | None:
    if name.startswith(STEP_PREFIX) and name[len(STEP_PREFIX):].isdigit():
        return int(name[len(STEP_PREFIX):])
    return None


@dataclass
class FolderState:
    """What a checkpoint folder holds, read without torch."""

    committed: list[int]  # step-N with .metadata
    incomplete: list[int]  # step-N without .metadata: never allowed
    restorable: list[int]  # .step-N.replaced with .metadata and no step-N: the restart restores them
    hidden: list[str]  # every hidden leftover name

    @property
    def expected_resume(self) -> int | None:
        candidates = self.committed + self.restorable
        return max(candidates) if candidates else None


def read_folder(root: Path) -> FolderState:
    committed, incomplete, restorable, hidden = [], [], [], []
    names = set(os.listdir(root)) if root.is_dir() else set()
    for name in names:
        step = _step_of(name)
        if step is not None:
            (committed if (root / name / ".metadata").is_file() else incomplete).append(step)
        elif name.startswith(".step-"):
            hidden.append(name)
            if name.endswith(".replaced"):
                step = int(name[len(".step-"):-len(".replaced")])
                if f"step-{step}" not in names and (root / name / ".metadata").is_file():
                    restorable.append(step)
    return FolderState(sorted(committed), sorted(incomplete), sorted(restorable), sorted(hidden))


def classify_phase(root: Path, dump: Path) -> str:
    """Where a kill landed, judged from what it left: cheap and approximate.

    - ``startup``: no metrics line yet (forking, building, loading, cleaning leftovers);
    - ``retention``: a ``.step-N.trash`` (a deletion between its rename and its rmtree);
    - ``resave``: a ``.step-N.replaced`` (a re-save between its two renames);
    - ``commit``: a ``.step-N.partial`` holding a manifest (between manifest and rename);
    - ``metadata``: a ``.step-N.partial`` holding ``.metadata`` but no manifest (DCP finished,
      manifest not written yet, or the manifest being written);
    - ``writing``: a ``.step-N.partial`` without ``.metadata`` (staging, shard writes, fsyncs; for
      async modes also the training steps that overlap the background write);
    - ``training``: none of these (a training step, or between saves).
    """
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        names = []
    if any(n.endswith(".trash") for n in names):
        return "retention"
    if any(n.endswith(".replaced") for n in names):
        return "resave"
    partial = [n for n in names if n.endswith(".partial")]
    if partial:
        inside = set(os.listdir(root / partial[0])) if (root / partial[0]).is_dir() else set()
        if "manifest.json" in inside:
            return "commit"
        if ".metadata" in inside:
            return "metadata"
        return "writing"
    metrics = dump / "metrics.jsonl"
    if not metrics.is_file() or metrics.stat().st_size == 0:
        return "startup"
    return "training"


def _integrity_module():
    try:
        from savepoint.checkpoint import integrity
    except ImportError:
        return None
    return integrity if hasattr(integrity, "verify_step") else None


def verify(step_dir: Path) -> list[str]:
    """Problems with one committed step (empty: it verifies).

    Uses ``savepoint.checkpoint.integrity.verify_step`` when present; otherwise the fallback check:
    ``.metadata`` unpickles and every file the manifest lists is present at its recorded size.
    """
    integrity = _integrity_module()
    if integrity is not None:
        report = integrity.verify_step(step_dir)
        return [] if report.ok else [str(p) for p in report.problems] or ["verify_step: not ok"]
    problems = []
    meta = step_dir / ".metadata"
    try:
        from savepoint.checkpoint.safe_load import safe_unpickle  # never the stock unpickler on a checkpoint

        safe_unpickle(meta.read_bytes(), str(meta))
    except Exception as e:  # noqa: BLE001 - any failure is a finding
        problems.append(f"{meta}: does not unpickle ({type(e).__name__}: {e})")
    manifest = step_dir / "manifest.json"
    try:
        files = json.loads(manifest.read_text())["files"]
    except Exception as e:  # noqa: BLE001
        return problems + [f"{manifest}: unreadable ({type(e).__name__}: {e})"]
    for name, size in files.items():
        path = step_dir / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != size:
            problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {size}")
    return problems


def verify_folder(root: Path, state: FolderState) -> list[str]:
    problems = [f"step-{s} is visible without .metadata (incomplete)" for s in state.incomplete]
    for step in state.committed:
        problems += [f"step-{step}: {p}" for p in verify(root / f"step-{step}")]
    return problems


# ---- losses ------------------------------------------------------------------------------------


def read_losses(dump: Path, offset: int = 0) -> tuple[list[tuple[int, float]], int]:
    """(step, loss) records appended to metrics.jsonl from byte ``offset`` on, and the new end offset.

    The file is append-only across runs; a killed run may leave a torn last line, which is skipped
    (the next run's first record then starts a new line only if the torn one ended with one).
    """
    path = dump / "metrics.jsonl"
    if not path.is_file():
        return [], offset
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    out = []
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            # A line torn by the kill, possibly continued by the next run's first record.
            start = line.rfind(b'{"step"')
            try:
                rec = json.loads(line[start:]) if start > 0 else None
            except ValueError:
                rec = None
            if rec is None:
                continue
        out.append((int(rec["step"]), float(rec["loss"])))
    return out, offset + len(data)


def compare_losses(got: list[tuple[int, float]], reference: dict[int, float]) -> list[str]:
    bad = []
    for step, loss in got:
        ref = reference.get(step)
        if ref is None or loss.hex() != ref.hex():
            bad.append(f"step {step}: loss {loss!r} != reference {ref!r}")
    return bad


# ---- trials ------------------------------------------------------------------------------------


@dataclass
class Reference:
    """The reference run's losses, and the run's timeline, kept up to date as trials run.

    The timeline (start-up, then training) starts as the reference run's and then follows the
    medians of the latest runs: on a shared machine a run's speed swings several-fold, and a fixed
    timeline would put many kills after the run ended (or all of them early).
    """

    losses: dict[int, float]
    wall_s: float  # fork to exit
    startup_s0: float  # fork to "loaded" (built, folder prepared, checkpoint looked for)
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

    def observe(self, run: Run, dump: Path, loaded: Any, finished: bool) -> None:
        path = dump / f"run{run.run_id}.loaded.json"
        if not path.is_file():
            return
        loaded_at = json.loads(path.read_text())["t"]
        self.startups.append(loaded_at - run.started)
        first = (loaded or 0) + 1
        if finished and run.ended is not None and first <= self.steps:
            self.step_times.append((run.ended - loaded_at) / (self.steps - first + 1))


def reference_run(spec: JobSpec, workdir: Path) -> Reference:
    """One uninterrupted run: the losses every trial must reproduce, and the wall time kills span."""
    dump = Path(tempfile.mkdtemp(prefix=f"ref-{spec.mode}-", dir=workdir))
    try:
        run = start_run(spec, dump, 0)
        if not run.wait(RUN_TIMEOUT_S) or not run.ok():
            run.kill()
            raise RuntimeError(f"reference run ({spec.mode}) failed: {run_error(dump, 0)}")
        wall = time.monotonic() - run.started
        startup = json.loads((dump / "run0.loaded.json").read_text())["t"] - run.started
        records, _ = read_losses(dump)
        losses = dict(records)
        if sorted(losses) != list(range(1, spec.steps + 1)):
            raise RuntimeError(f"reference run ({spec.mode}) logged steps {sorted(losses)}")
        state = read_folder(checkpoint_root(dump))
        problems = verify_folder(checkpoint_root(dump), state)
        if problems or state.committed != spec.final_steps():
            raise RuntimeError(f"reference run ({spec.mode}): folder {state.committed}, problems {problems}")
        return Reference(losses, wall, startup, spec.steps)
    finally:
        shutil.rmtree(dump, ignore_errors=True)


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

    def fail(self, outcome: str, problem: str) -> None:
        if self.outcome == "ok":
            self.outcome = outcome
        self.problems.append(problem)


def run_trial(trial: int, spec: JobSpec, ref: Reference, rng: random.Random, workdir: Path,
              kills_per_trial: int = 1, keep_failed: bool = True) -> TrialResult:
    """Kill the job ``kills_per_trial`` times at random instants, then let it finish; check everything."""
    result = TrialResult(trial, spec.mode)
    started = time.monotonic()
    dump = Path(tempfile.mkdtemp(prefix=f"trial{trial}-{spec.mode}-", dir=workdir))
    root = checkpoint_root(dump)
    offset = 0
    try:
        run_id = 0
        for segment in range(kills_per_trial + 1):
            run_id = segment
            run = start_run(spec, dump, run_id)
            killing = segment < kills_per_trial
            if killing:
                delay = rng.uniform(0.0, ref.timeline_s())
                if run_until(run, dump, delay, ref):
                    result.completed_before_kill = True
                    killing = False
                else:
                    run.kill()
            if not killing and not run.wait(RUN_TIMEOUT_S):
                run.kill()
                result.fail("unloadable", f"run {run_id} hung for {RUN_TIMEOUT_S:.0f} s")
                break
            # Losses the run logged (its own records only: the file is append-only across runs).
            records, offset = read_losses(dump, offset)
            for problem in compare_losses(records, ref.losses):
                result.fail("mismatch", f"run {run_id}: {problem}")
            if segment > 0:
                loaded = _loaded(dump, run_id)
                expected = result.kills[-1][2]
                if loaded == "missing":
                    if not killing:  # a finished run must have written it; a killed one may not have yet
                        result.fail("unloadable", f"run {run_id}: never got past loading ({run_error(dump, run_id)})")
                elif loaded != expected:
                    result.fail("wrong_step", f"run {run_id}: loaded step {loaded}, newest committed was {expected}")
                elif records and records[0][0] != (expected or 0) + 1:
                    result.fail("wrong_step", f"run {run_id}: first step {records[0][0]} after loading {expected}")
            if killing:
                phase = classify_phase(root, dump)
                state = read_folder(root)
                result.kills.append((delay, phase, state.expected_resume))
                for problem in verify_folder(root, state):
                    result.fail("corrupt", f"after kill {segment + 1} ({phase}): {problem}")
                continue
            if not run.ok():
                result.fail("unloadable", f"run {run_id} exited {run.exit_codes()}: {run_error(dump, run_id)}")
                break
            ref.observe(run, dump, None if segment == 0 else _loaded(dump, run_id), finished=True)
            # Finished: every step logged by someone, the folder as an uninterrupted run leaves it.
            state = read_folder(root)
            for problem in verify_folder(root, state):
                result.fail("corrupt", f"at the end: {problem}")
            if state.committed != spec.final_steps() or state.hidden:
                result.fail("leftover", f"at the end: steps {state.committed} (expected {spec.final_steps()}), "
                                        f"hidden {state.hidden}")
            break
    except Exception as e:  # noqa: BLE001 - a harness failure is reported, not hidden
        result.fail("harness", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    result.wall_s = time.monotonic() - started
    if result.outcome == "ok" or not keep_failed:
        shutil.rmtree(dump, ignore_errors=True)
    else:
        result.problems.append(f"kept {dump}")
    return result


def run_until(run: Run, dump: Path, delay: float, ref: Reference) -> bool:
    """Let ``run`` go on until the instant ``delay`` of the reference run's timeline; True if it exited first.

    The timeline has two parts (see ``Reference``): start-up (fork until the checkpoint was looked
    for and loaded) and training (from there to exit). A delay within the
    start-up part is waited from the fork; a later one from the moment this run reports it loaded.
    So kills stay uniform over the phases of the run even when start-up is slower than it was for
    the reference (a loaded machine), instead of piling up in start-up.
    """
    if delay < ref.startup_s:
        return run.wait(delay)
    loaded_file = dump / f"run{run.run_id}.loaded.json"
    while not loaded_file.is_file():
        if run.wait(0.002):
            return True
        if time.monotonic() - run.started > RUN_TIMEOUT_S:
            return False  # hung in start-up: kill it; the checks report what it left
    loaded_at = json.loads(loaded_file.read_text())["t"]
    remaining = loaded_at + (delay - ref.startup_s) - time.monotonic()
    return run.wait(max(remaining, 0.0))


def _loaded(dump: Path, run_id: int) -> Any:
    path = dump / f"run{run_id}.loaded.json"
    if not path.is_file():
        return "missing"
    return json.loads(path.read_text())["loaded"]


# ---- launcher kills ----------------------------------------------------------------------------
#
# ``--target launcher`` runs each job as a user does: ``python -m savepoint.launch`` (what
# ``./run_train.sh`` execs) starting its workers with torchrun, and SIGKILLs the launcher alone
# (``kill -9 PID``, the OOM killer) or its whole process group (a terminal, ``kill -9 -PGID``, a
# batch system without cgroups), alternating. torchrun puts each worker in a session of its own, so
# neither kill reaches the workers by itself. Then every process of the job (the launcher, its
# workers, their writer processes and helpers) must be gone within ``SURVIVOR_GRACE_S``, and the
# restart, started at once, must succeed and resume from the newest committed step.

SURVIVOR_GRACE_S = 2.0
LAUNCHER_KILLS = ("pid", "group")


def launcher_command(spec: JobSpec, dump: Path) -> list[str]:
    """The command ``./run_train.sh`` execs (NGPU = the world size), training ``spec`` in ``dump``."""
    return [sys.executable, "-m", "savepoint.launch", f"--nproc_per_node={spec.world_size}", "--rdzv_backend",
            "c10d", "--rdzv_endpoint=localhost:0", "--local-ranks-filter", "0", "--role", "rank", "--tee", "3",
            "-m", "savepoint", "train", *spec.argv(dump)]


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, session id) of a process, None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, session, ...
    return fields[0], int(fields[1]), int(fields[3])


def job_processes(launcher_pid: int, dump: Path) -> dict[int, str]:
    """The live processes of the job a launcher started: pid -> command line (zombies are dead).

    Found without help from the code under test: the launcher's own session (it starts one), every
    process whose command line names the job's dump folder (the workers), every process in a
    worker's session (torchrun starts each worker in its own; its writer process and helpers stay
    in it), and every process that inherited ``SAVEPOINT_LAUNCHER_PID`` of this launcher.
    """
    marker = f"SAVEPOINT_LAUNCHER_PID={launcher_pid}\0".encode()
    needle = f"{dump}{os.sep}".encode(), str(dump).encode() + b"\0"
    table: dict[int, tuple[str, int, bytes]] = {}
    workers: set[int] = set()
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        stat = _proc_stat(pid)
        if stat is None or stat[0] in ("Z", "X"):
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes() + b"\0"
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        table[pid] = (stat[0], stat[2], cmdline)
        if any(n in cmdline for n in needle) or b"\0" + marker in b"\0" + environ:
            workers.add(pid)
    members = {pid for pid, (_, sid, _) in table.items()
               if pid == launcher_pid or sid == launcher_pid or pid in workers or sid in workers}
    return {pid: table[pid][2].replace(b"\0", b" ").decode(errors="replace").strip()[:300] for pid in members}


@dataclass
class LauncherRun:
    """One job started through the launcher, in a session of its own."""

    run_id: int
    proc: Any  # subprocess.Popen
    dump: Path
    started: float

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, timeout: float) -> bool:
        try:
            self.proc.wait(timeout=max(timeout, 0.0))
            return True
        except subprocess.TimeoutExpired:
            return False

    def output(self) -> str:
        return "".join((self.dump / f"run{self.run_id}.{s}").read_text(errors="replace") for s in ("out", "err"))


def start_launcher_run(spec: JobSpec, dump: Path, run_id: int) -> LauncherRun:
    dump.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("SAVEPOINT_DEBUG", None)
    with open(dump / f"run{run_id}.out", "wb") as out, open(dump / f"run{run_id}.err", "wb") as err:
        proc = subprocess.Popen(launcher_command(spec, dump), cwd=ROOT, env=env, stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return LauncherRun(run_id, proc, dump, time.monotonic())


def _metrics_started(dump: Path, offset: int) -> bool:
    path = dump / "metrics.jsonl"
    try:
        return path.stat().st_size > offset
    except OSError:
        return False


def launcher_run_until(run: LauncherRun, delay: float, ref: Reference, offset: int) -> bool:
    """Like ``run_until``, the start-up part ending at the run's first metrics record; True if it exited first."""
    if delay < ref.startup_s:
        return run.wait(delay)
    while not _metrics_started(run.dump, offset):
        if run.wait(0.005):
            return True
        if time.monotonic() - run.started > RUN_TIMEOUT_S:
            return False
    training_from = time.monotonic()
    return run.wait(training_from + (delay - ref.startup_s) - time.monotonic())


def wait_observing(run: LauncherRun, offset: int, timeout: float) -> tuple[bool, float | None]:
    """Wait until the run exits or ``timeout``; returns (exited, seconds until its first metrics record)."""
    first = None
    while not run.wait(0.005):
        if first is None and _metrics_started(run.dump, offset):
            first = time.monotonic() - run.started
        if time.monotonic() - run.started > timeout:
            return False, first
    return True, first


def _resumed_from(output: str) -> int | None:
    """The step a finished launcher run trained from ("training ... from step N to M"), None if not logged."""
    found = re.findall(r"training \S+ \(\S+\) from step (\d+) to (\d+)", output)
    return int(found[-1][0]) if found else None


def kill_launcher(run: LauncherRun, how: str) -> None:
    """SIGKILL the launcher (``pid``) or its process group (``group``) and reap the launcher."""
    try:
        if how == "group":
            os.killpg(run.pid, signal.SIGKILL)
        else:
            os.kill(run.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    run.proc.wait()


def wait_for_survivors(run: LauncherRun, grace: float) -> tuple[dict[int, str], float]:
    """Poll the job's processes until none is left or ``grace`` passed; returns (survivors, seconds until gone)."""
    killed = time.monotonic()
    while True:
        left = job_processes(run.pid, run.dump)
        waited = time.monotonic() - killed
        if not left:
            return {}, waited
        if waited > grace:
            return left, waited
        time.sleep(0.01)


def reap_survivors(run: LauncherRun) -> None:
    """SIGKILL what is left of a killed job (survivors are reported first) and wait until it is gone."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = job_processes(run.pid, run.dump)
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)


def launcher_reference_run(spec: JobSpec, workdir: Path) -> Reference:
    """One uninterrupted launcher run: the losses every launcher trial must reproduce, and its timeline."""
    dump = Path(tempfile.mkdtemp(prefix=f"ref-launcher-{spec.mode}-", dir=workdir))
    try:
        run = start_launcher_run(spec, dump, 0)
        exited, first_metrics = wait_observing(run, 0, RUN_TIMEOUT_S)
        if not exited:
            kill_launcher(run, "group")
            reap_survivors(run)
            raise RuntimeError(f"launcher reference run ({spec.mode}) hung: {run.output()[-2000:]}")
        wall = time.monotonic() - run.started
        if run.proc.returncode != 0:
            raise RuntimeError(f"launcher reference run ({spec.mode}) exited {run.proc.returncode}: "
                               f"{run.output()[-3000:]}")
        records, _ = read_losses(dump)
        losses = dict(records)
        if sorted(losses) != list(range(1, spec.steps + 1)):
            raise RuntimeError(f"launcher reference run ({spec.mode}) logged steps {sorted(losses)}")
        state = read_folder(checkpoint_root(dump))
        problems = verify_folder(checkpoint_root(dump), state)
        if problems or state.committed != spec.final_steps():
            raise RuntimeError(f"launcher reference run ({spec.mode}): folder {state.committed}, problems {problems}")
        return Reference(losses, wall, first_metrics or wall / 2, spec.steps)
    finally:
        shutil.rmtree(dump, ignore_errors=True)


def run_launcher_trial(trial: int, spec: JobSpec, ref: Reference, rng: random.Random, workdir: Path,
                       kills_per_trial: int = 1, keep_failed: bool = True) -> TrialResult:
    """``run_trial`` for ``--target launcher``: SIGKILL the launcher (or its group) at random instants."""
    result = TrialResult(trial, spec.mode)
    started = time.monotonic()
    dump = Path(tempfile.mkdtemp(prefix=f"trial{trial}-launcher-{spec.mode}-", dir=workdir))
    root = checkpoint_root(dump)
    offset = 0
    survivors: list[LauncherRun] = []
    try:
        for segment in range(kills_per_trial + 1):
            run = start_launcher_run(spec, dump, segment)
            killing = segment < kills_per_trial
            first_metrics = None
            if killing:
                delay = rng.uniform(0.0, ref.timeline_s())
                how = LAUNCHER_KILLS[rng.randrange(len(LAUNCHER_KILLS))]
                if launcher_run_until(run, delay, ref, offset):
                    result.completed_before_kill = True
                    killing = False
                else:
                    kill_launcher(run, how)
                    phase = classify_phase(root, dump)
                    left, gone_s = wait_for_survivors(run, SURVIVOR_GRACE_S)
                    kill = {"how": how, "phase": phase, "survivors": len(left), "gone_s": round(gone_s, 3)}
                    result.launcher_kills.append(kill)
                    if left:
                        survivors.append(run)  # left running: the restart meets them, as it would in real life
                        result.fail("survivor", f"kill {segment + 1} ({how}, {phase}): {len(left)} process(es) of "
                                                f"the job alive {SURVIVOR_GRACE_S:.0f} s after the kill: "
                                                + "; ".join(f"{p} {c}" for p, c in sorted(left.items())))
            if not killing:
                exited, first_metrics = wait_observing(run, offset, RUN_TIMEOUT_S)
                if not exited:
                    kill_launcher(run, "group")
                    reap_survivors(run)
                    result.fail("unloadable", f"run {segment} hung for {RUN_TIMEOUT_S:.0f} s")
                    break
            records, new_offset = read_losses(dump, offset)
            for problem in compare_losses(records, ref.losses):
                result.fail("mismatch", f"run {segment}: {problem}")
            if segment > 0:
                expected = result.kills[-1][2]
                resumed = _resumed_from(run.output())
                if resumed is not None and resumed != (expected or 0):
                    result.fail("wrong_step", f"run {segment}: trained from step {resumed}, newest committed was "
                                              f"{expected}")
                elif records and records[0][0] != (expected or 0) + 1:
                    result.fail("wrong_step", f"run {segment}: first step {records[0][0]} after {expected}")
            offset = new_offset
            if killing:
                state = read_folder(root)  # the job is gone (or the survivors are reported)
                result.kills.append((delay, phase, state.expected_resume))
                for problem in verify_folder(root, state):
                    result.fail("corrupt", f"after kill {segment + 1} ({phase}): {problem}")
                continue
            code = run.proc.returncode
            if segment > 0:
                result.restarts.append("ok" if code == 0 else f"exit {code}")
            if code != 0:
                tail = [ln for ln in run.output().splitlines() if "error" in ln.lower()][-3:]
                result.fail("unloadable", f"run {segment} exited {code}: {' | '.join(tail)[-1500:]}")
                break
            if first_metrics is not None:
                ref.startups.append(first_metrics)
            # Finished: the folder as an uninterrupted run leaves it.
            state = read_folder(root)
            for problem in verify_folder(root, state):
                result.fail("corrupt", f"at the end: {problem}")
            if state.committed != spec.final_steps() or state.hidden:
                result.fail("leftover", f"at the end: steps {state.committed} (expected {spec.final_steps()}), "
                                        f"hidden {state.hidden}")
            break
    except Exception as e:  # noqa: BLE001 - a harness failure is reported, not hidden
        result.fail("harness", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    finally:
        for run in survivors:
            reap_survivors(run)
    result.wall_s = time.monotonic() - started
    if result.outcome == "ok" or not keep_failed:
        shutil.rmtree(dump, ignore_errors=True)
    else:
        result.problems.append(f"kept {dump}")
    return result


# ---- the campaign ------------------------------------------------------------------------------


@dataclass
class Summary:
    results: list[TrialResult]
    wall_s: float
    references: dict[str, Reference]

    @property
    def bad(self) -> list[TrialResult]:
        return [r for r in self.results if r.outcome != "ok"]

    def outcomes(self) -> Counter:
        return Counter(r.outcome for r in self.results)

    def phases(self) -> Counter:
        return Counter(phase for r in self.results for _, phase, _ in r.kills)

    def as_json(self) -> dict:
        return {"trials": len(self.results), "kills": sum(len(r.kills) for r in self.results),
                "bad": len(self.bad), "outcomes": dict(self.outcomes()), "phases": dict(self.phases()),
                "by_mode": dict(Counter(r.mode for r in self.results)), "wall_s": self.wall_s,
                "verify": "verify_step" if _integrity_module() else "fallback",
                "launcher": self.launcher_counts(),
                "bad_trials": [_result_to_json(r) for r in self.bad]}

    def launcher_counts(self) -> dict | None:
        """--target launcher: kills by kind, survivors, how long the job took to go, restart outcomes."""
        kills = [k for r in self.results for k in r.launcher_kills]
        if not kills and not any(r.restarts for r in self.results):
            return None
        gone = sorted(k["gone_s"] for k in kills if not k["survivors"])
        return {"kills": len(kills), "by_kind": dict(Counter(k["how"] for k in kills)),
                "kills_with_survivors": sum(1 for k in kills if k["survivors"]),
                "survivors": sum(k["survivors"] for k in kills),
                "gone_s_median": statistics.median(gone) if gone else None, "gone_s_max": gone[-1] if gone else None,
                "restarts": dict(Counter(x for r in self.results for x in r.restarts))}

    def report(self) -> str:
        kills = sum(len(r.kills) for r in self.results)
        lines = [f"kill trials: {len(self.results)} trials, {kills} kills, {self.wall_s:.1f} s wall "
                 f"({self.wall_s / max(len(self.results), 1):.2f} s/trial)"]
        for mode, ref in self.references.items():
            rs = [r for r in self.results if r.mode == mode]
            lines.append(f"  {mode:22s} trials {len(rs):5d}  bad {sum(r.outcome != 'ok' for r in rs):3d}  "
                         f"reference run {ref.wall_s:.2f} s (start-up {ref.startup_s0:.2f} s)")
        out = self.outcomes()
        lines.append("outcomes: " + ", ".join(f"{k} {out.get(k, 0)}" for k in
                                              ("ok", "corrupt", "unloadable", "wrong_step", "mismatch",
                                               "leftover", "survivor", "harness")))
        ph = self.phases()
        lines.append("kills by phase: " + ", ".join(f"{k} {v}" for k, v in sorted(ph.items(), key=lambda kv: -kv[1])))
        lines.append(f"finished before the kill: {sum(r.completed_before_kill for r in self.results)}")
        resumed = Counter("fresh start" if e is None else "resume" for r in self.results for _, _, e in r.kills)
        lines.append("restarts: " + ", ".join(f"{k} {v}" for k, v in sorted(resumed.items())))
        launcher = self.launcher_counts()
        if launcher is not None:
            gone = "" if launcher["gone_s_max"] is None else (
                f"; job gone {launcher['gone_s_median']:.3f} s after the kill (median), "
                f"{launcher['gone_s_max']:.3f} s max")
            kinds = ", ".join(f"{k} {v}" for k, v in launcher["by_kind"].items())
            lines.append(f"launcher kills: {launcher['kills']} ({kinds}); "
                         f"kills leaving survivors after {SURVIVOR_GRACE_S:.0f} s: {launcher['kills_with_survivors']} "
                         f"({launcher['survivors']} processes){gone}; restarts that ran to the end: "
                         + ", ".join(f"{k} {v}" for k, v in launcher["restarts"].items()))
        for r in self.bad[:20]:
            lines.append(f"BAD trial {r.trial} ({r.mode}, kills {[(round(d, 3), p) for d, p, _ in r.kills]}): "
                         f"{r.outcome}: {' | '.join(r.problems)[:2000]}")
        how = "savepoint.checkpoint.integrity.verify_step" if _integrity_module() else \
            "fallback (.metadata unpickles, manifest sizes)"
        lines.append(f"verify: {how}")
        return "\n".join(lines)


def warm_up(workdir: Path) -> None:
    """Build a Trainer, train and save one step, and load it, in this (the harness) process.

    Forked runs then start from warm caches (lazy imports, dispatcher, planner code paths): about
    1 s less start-up per run. It runs with one intra-op thread and starts no thread (checked:
    the process has the same OS threads before and after), so forking afterwards stays safe.
    Everything it touches that matters to training (seeds, RNG) is set again by each run.
    """
    before = _os_threads()
    torch.set_num_threads(1)
    scratch = Path(tempfile.mkdtemp(prefix="warmup-", dir=workdir))
    log = logging.getLogger("savepoint")
    level, propagate = log.level, log.propagate
    log.setLevel(logging.ERROR)
    log.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec = JobSpec(mode="disabled", steps=1)
            trainer = Trainer(parse_args(spec.argv(scratch), environ={}))
            trainer.train()
            trainer.checkpointer.close()
            trainer = Trainer(parse_args(spec.argv(scratch), environ={}))
            trainer.load_checkpoint()
            trainer.checkpointer.close()
            del trainer
    finally:
        log.setLevel(level)
        log.propagate = propagate
        shutil.rmtree(scratch, ignore_errors=True)
    after = _os_threads()
    if after > before:
        raise RuntimeError(f"warm-up left {after - before} extra threads in the harness: forking is unsafe; "
                           "run with --no-warmup")


def _os_threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def _trial_rng(seed: int, trial: int) -> random.Random:
    """Each trial's own generator: the same kills for a seed whatever ``jobs`` is."""
    return random.Random(seed * 1_000_003 + trial)


def _result_to_json(r: TrialResult) -> dict:
    return {"trial": r.trial, "mode": r.mode, "kills": r.kills, "outcome": r.outcome, "problems": r.problems,
            "completed_before_kill": r.completed_before_kill, "wall_s": r.wall_s,
            "launcher_kills": r.launcher_kills, "restarts": r.restarts}


def _result_from_json(d: dict) -> TrialResult:
    return TrialResult(d["trial"], d["mode"], [tuple(k) for k in d["kills"]], d["outcome"], d["problems"],
                       d["completed_before_kill"], d["wall_s"], d.get("launcher_kills", []), d.get("restarts", []))


def _worker(indices: list[int], specs: dict[str, JobSpec], refs: dict[str, Reference], modes: tuple[str, ...],
            seed: int, work: Path, kills_per_trial: int, out: Path, started: float, progress: bool,
            target: str = "job") -> None:
    """A forked worker: runs its share of the trials, appending each result as a JSON line to ``out``."""
    code = 1
    try:
        with open(out, "a", encoding="utf-8") as f:
            for done, i in enumerate(indices, 1):
                mode = modes[i % len(modes)]
                trial = run_launcher_trial if target == "launcher" else run_trial
                result = trial(i, specs[mode], refs[mode], _trial_rng(seed, i), work, kills_per_trial)
                f.write(json.dumps(_result_to_json(result)) + "\n")
                f.flush()
                if progress and (result.outcome != "ok" or done % 25 == 0):
                    print(f"[{time.monotonic() - started:7.1f} s] worker {os.getpid()}: {done}/{len(indices)}"
                          + (f"; trial {i} ({mode}): {result.outcome}: {result.problems[0][:400]}"
                             if result.outcome != "ok" else ""), flush=True)
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def run_trials(trials: int, seed: int = 0, modes: tuple[str, ...] = MODES, world_size: int = 1,
               steps: int = 6, interval: int = 1, keep: int = 2, kills_per_trial: int = 1,
               workdir: str | Path | None = None, progress: bool = False, jobs: int = 1,
               warmup: bool = True, target: str = "job") -> Summary:
    """Run ``trials`` kill trials, spread round-robin over ``modes``, ``jobs`` at a time; returns the summary.

    ``target``: ``job`` kills the forked ranks' process group; ``launcher`` runs each job through
    ``savepoint.launch`` (torchrun) and kills the launcher or its group (see "launcher kills").
    """
    started = time.monotonic()
    own_workdir = workdir is None
    work = Path(tempfile.mkdtemp(prefix="kill-trials-")) if own_workdir else Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    results: list[TrialResult] = []
    try:
        launcher = target == "launcher"
        if warmup and not launcher:
            warm_up(work)
        specs = {m: JobSpec(mode=m, steps=steps, interval=interval, keep=keep, world_size=world_size)
                 for m in modes}
        refs = {m: (launcher_reference_run if launcher else reference_run)(specs[m], work) for m in modes}
        trial_fn = run_launcher_trial if launcher else run_trial
        if jobs <= 1:
            for i in range(trials):
                mode = modes[i % len(modes)]
                result = trial_fn(i, specs[mode], refs[mode], _trial_rng(seed, i), work, kills_per_trial)
                results.append(result)
                if progress and (result.outcome != "ok" or (i + 1) % 50 == 0):
                    bad = sum(r.outcome != "ok" for r in results)
                    print(f"[{time.monotonic() - started:7.1f} s] {i + 1}/{trials} trials, {bad} bad"
                          + (f"; trial {i} ({mode}): {result.outcome}: {result.problems[0][:400]}"
                             if result.outcome != "ok" else ""), flush=True)
        else:
            workers = {}
            for w in range(jobs):
                out = work / f"worker{w}.jsonl"
                out.unlink(missing_ok=True)
                sys.stdout.flush()
                pid = os.fork()
                if pid == 0:
                    _worker(list(range(w, trials, jobs)), specs, refs, modes, seed, work, kills_per_trial, out,
                            started, progress, target)
                workers[pid] = out
            failed = []
            for pid, out in workers.items():
                if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
                    failed.append(pid)
                if out.is_file():
                    results += [_result_from_json(json.loads(line)) for line in out.read_text().splitlines()]
            if failed:
                raise RuntimeError(f"kill-trial workers {failed} failed (their traceback is above)")
            results.sort(key=lambda r: r.trial)
    finally:
        if own_workdir and not any(r.outcome != "ok" for r in results):
            shutil.rmtree(work, ignore_errors=True)
    return Summary(results, time.monotonic() - started, refs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", choices=(*MODES, "all"), default="all")
    p.add_argument("--world-size", type=int, choices=(1, 2), default=1)
    p.add_argument("--steps", type=int, default=6, help="training.steps of the job (default 6)")
    p.add_argument("--interval", type=int, default=1, help="checkpoint.interval (default 1)")
    p.add_argument("--keep", type=int, default=2, help="checkpoint.keep_latest_k (default 2)")
    p.add_argument("--kills-per-trial", type=int, default=1)
    p.add_argument("--target", choices=("job", "launcher"), default="job",
                   help="job: fork the ranks and SIGKILL their process group (default); launcher: run each job "
                        "through savepoint.launch (torchrun, as ./run_train.sh does) and SIGKILL the launcher or "
                        "its process group, then require every process of the job gone within 2 s")
    p.add_argument("--jobs", type=int, default=1, help="trials run at a time (forked workers; default 1)")
    p.add_argument("--no-warmup", action="store_true",
                   help="do not warm up the harness process before forking (each run then starts ~1 s slower)")
    p.add_argument("--workdir", default=None, help="where trial folders go (default: a fresh temp folder)")
    p.add_argument("--json", default=None, help="also write the counts as JSON to this file")
    args = p.parse_args(argv)
    modes = MODES if args.mode == "all" else (args.mode,)
    summary = run_trials(args.trials, args.seed, modes, args.world_size, args.steps, args.interval, args.keep,
                         args.kills_per_trial, args.workdir, progress=True, jobs=args.jobs,
                         warmup=not args.no_warmup, target=args.target)
    print(summary.report())
    if args.json:
        Path(args.json).write_text(json.dumps(summary.as_json(), indent=2))
    return 1 if summary.bad else 0


if __name__ == "__main__":
    sys.exit(main())
