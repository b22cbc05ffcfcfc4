"""Kill trials: SIGKILL a training job at a random instant, restart it, and check the checkpoints held.

Run from the repository root with the project's interpreter (``scripts/bootstrap.sh`` makes it)::

    .venv/bin/python -m tests.trials.kill --trials 1000 --seed 0 --mode all          # ws=1
    .venv/bin/python -m tests.trials.kill --trials 60 --seed 0 --mode all --world-size 2
    .venv/bin/python -m tests.trials.kill --trials 30 --target launcher --world-size 2 --mode all
    .venv/bin/python -m tests.trials.kill --trials 30 --world-size 2 --pp 2 --mode all      # 2 pipeline stages
    .venv/bin/python -m tests.trials.kill --trials 30 --target worker --world-size 2 --mode all
    .venv/bin/python -m tests.trials.kill --trials 30 --target worker --world-size 2 --memory-interval 1

``--pp 2`` runs the job with pipeline parallelism (``--pp-schedule``, Interleaved1F1B by default:
two stages per rank); the world size must be a multiple of it. ``--help`` lists every option.
The exit status is 1 if any trial went wrong; ``--json FILE`` also writes the counts.
``tests/test_kill_trials.py`` runs small campaigns (the full ones under the ``slow`` marker).

``--target job`` (the default, ``tests.trials.forked``) forks the job's ranks and kills their
process group; ``--target launcher`` (``tests.trials.launcher``) kills the launcher (torchrun, as
``./run_train.sh`` runs it) or its process group instead, and then also requires every process of
the job gone within 2 s. ``--target worker`` (``tests.trials.restart``) runs the job through the
launcher with torchrun restarts (``--max-restarts``, by default one per kill) and SIGKILLs one worker
(a random rank) instead: the job must then finish by itself, exit 0, with every loss bit-identical
to the reference run's (see that module). ``--memory-interval K`` gives the job the in-memory tier
(``--checkpoint.memory_interval K``), so restarts may resume from RAM.

Each trial trains the ``debugmodel`` (tiny batches, a checkpoint every ``--interval`` steps,
``keep_latest_k=2`` so retention deletes steps, full final save) in a fresh folder, kills the whole
job (trainer ranks, writer threads and writer processes) with SIGKILL at an instant drawn uniformly
over the timeline of an uninterrupted reference run (start-up, then training; see
``forked.run_until``), so kills land during start-up (including the removal of leftovers and the
load), training steps, staging, DCP writes and fsyncs, ``.metadata``, the manifest, the rename and
retention. Then it restarts the job (auto-resume) and lets it run to the end, and checks:

a. the restart loaded the newest committed step that was in the folder right after the kill
   (``step-N`` folders holding ``.metadata``; a ``.step-N.replaced`` whose ``step-N`` is missing
   counts too, since the protocol restores it);
b. every loss the restarted run logged is bit-identical to the loss of an uninterrupted reference
   run at that step (and so is every loss the killed run logged before it died);
c. every ``step-N`` visible right after the kill, and at the end, is complete and passes
   ``savepoint.checkpoint.verify.verify_step``, and the finished job's folder holds exactly the
   newest ``keep_latest_k`` saved steps and no leftovers.

Speed: the harness imports torch and savepoint once and forks one child per run; a trial costs
about one uninterrupted run plus one start-up. ``--jobs N`` runs N trials at a time (forked
workers); a seed draws the same kills whatever ``--jobs`` is.

With ``--kills-per-trial K`` a trial kills the job K times in a row (each restart is checked like
the first) before the last restart runs to the end. The phase a kill landed in is read off the
folder right after the kill (see ``folder.classify_phase``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from savepoint.job import parse_args
from savepoint.train import Trainer
from tests.trials.common import finish, quiet_log
from tests.trials.forked import reference_run, run_trial
from tests.trials.job import MODES, JobSpec, Reference, TrialResult
from tests.trials.launcher import SURVIVOR_GRACE_S, launcher_reference_run, run_launcher_trial
from tests.trials.restart import run_worker_trial

OUTCOMES = ("ok", "corrupt", "unloadable", "wrong_step", "mismatch", "leftover", "survivor", "harness")


@dataclass
class Summary:
    results: list[TrialResult]
    wall_s: float
    references: dict[str, Reference]
    layout: dict = field(default_factory=dict)  # the job's world_size, pp and pp_schedule

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
                "launcher": self.launcher_counts(), "layout": self.layout,
                "bad_trials": [r.as_json() for r in self.bad]}

    def launcher_counts(self) -> dict | None:
        """--target launcher: kills by kind, survivors, how long the job took to go, restart outcomes."""
        kills = [k for r in self.results for k in r.launcher_kills]
        if not kills and not any(r.restarts for r in self.results):
            return None
        gone = sorted(k["gone_s"] for k in kills if not k["survivors"])
        first = sorted(k["first_step_s"] for k in kills if k.get("first_step_s") is not None)
        return {"first_step_s_median": statistics.median(first) if first else None,
                "first_step_s_max": first[-1] if first else None,
                "from_memory": sum(1 for k in kills if k.get("memory") is not None and k.get("expected") == k["memory"]
                                   and k["memory"] != k.get("durable")),
                "kills": len(kills), "by_kind": dict(Counter(k["how"] for k in kills)),
                "kills_with_survivors": sum(1 for k in kills if k["survivors"]),
                "survivors": sum(k["survivors"] for k in kills),
                "gone_s_median": statistics.median(gone) if gone else None, "gone_s_max": gone[-1] if gone else None,
                "restarts": dict(Counter(x for r in self.results for x in r.restarts))}

    def report(self) -> str:
        kills = sum(len(r.kills) for r in self.results)
        lines = [f"kill trials: {len(self.results)} trials, {kills} kills, {self.wall_s:.1f} s wall "
                 f"({self.wall_s / max(len(self.results), 1):.2f} s/trial)"]
        if self.layout:
            pipeline = f", PP {self.layout['pp']} ({self.layout['pp_schedule']})" if self.layout["pp"] > 1 else ""
            lines.append(f"job: world size {self.layout['world_size']}{pipeline}")
        for mode, ref in self.references.items():
            rs = [r for r in self.results if r.mode == mode]
            lines.append(f"  {mode:22s} trials {len(rs):5d}  bad {sum(r.outcome != 'ok' for r in rs):3d}  "
                         f"reference run {ref.wall_s:.2f} s (start-up {ref.startup_s0:.2f} s)")
        out = self.outcomes()
        lines.append("outcomes: " + ", ".join(f"{k} {out.get(k, 0)}" for k in OUTCOMES))
        ph = self.phases()
        lines.append("kills by phase: " + ", ".join(f"{k} {v}" for k, v in sorted(ph.items(), key=lambda kv: -kv[1])))
        lines.append(f"finished before the kill: {sum(r.completed_before_kill for r in self.results)}")
        resumed = Counter("fresh start" if e is None else "resume" for r in self.results for _, _, e in r.kills)
        lines.append("restarts: " + ", ".join(f"{k} {v}" for k, v in sorted(resumed.items())))
        launcher = self.launcher_counts()
        if launcher is not None:
            lines.append(_launcher_line(launcher))
        for r in self.bad[:20]:
            lines.append(f"BAD trial {r.trial} ({r.mode}, kills {[(round(d, 3), p) for d, p, _ in r.kills]}): "
                         f"{r.outcome}: {' | '.join(r.problems)[:2000]}")
        return "\n".join(lines)


def _launcher_line(launcher: dict) -> str:
    gone = "" if launcher["gone_s_max"] is None else (
        f"; job gone {launcher['gone_s_median']:.3f} s after the kill (median), {launcher['gone_s_max']:.3f} s max")
    kinds = ", ".join(f"{k} {v}" for k, v in launcher["by_kind"].items())
    if launcher["by_kind"].get("worker"):
        first = "" if launcher["first_step_s_max"] is None else (
            f"; kill to the restarted job's first step {launcher['first_step_s_median']:.2f} s (median), "
            f"{launcher['first_step_s_max']:.2f} s max")
        return (f"worker kills: {launcher['kills']}; restarts from the in-memory tier {launcher['from_memory']}; "
                f"failed group stopped {launcher['gone_s_median']:.3f} s after the kill (median){first}; jobs that "
                "finished: " + ", ".join(f"{k} {v}" for k, v in launcher["restarts"].items()))
    return (f"launcher kills: {launcher['kills']} ({kinds}); kills leaving survivors after {SURVIVOR_GRACE_S:.0f} s: "
            f"{launcher['kills_with_survivors']} ({launcher['survivors']} processes){gone}; restarts that ran to "
            "the end: " + ", ".join(f"{k} {v}" for k, v in launcher["restarts"].items()))


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
    try:
        with quiet_log(logging.ERROR), warnings.catch_warnings():
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


@dataclass
class Campaign:
    """What every trial of a campaign shares: its jobs and references by mode, the seed, the folder."""

    specs: dict[str, JobSpec]
    refs: dict[str, Reference]
    modes: tuple[str, ...]
    seed: int
    work: Path
    kills_per_trial: int
    target: str
    started: float
    progress: bool

    def run(self, i: int) -> TrialResult:
        mode = self.modes[i % len(self.modes)]
        trial = {"launcher": run_launcher_trial, "worker": run_worker_trial}.get(self.target, run_trial)
        return trial(i, self.specs[mode], self.refs[mode], _trial_rng(self.seed, i), self.work, self.kills_per_trial)

    def note(self, result: TrialResult, head: str) -> None:
        if self.progress:
            detail = "" if result.outcome == "ok" else \
                f"; trial {result.trial} ({result.mode}): {result.outcome}: {result.problems[0][:400]}"
            print(f"[{time.monotonic() - self.started:7.1f} s] {head}{detail}", flush=True)


def _worker(campaign: Campaign, indices: list[int], out: Path) -> None:
    """A forked worker: runs its share of the trials, appending each result as a JSON line to ``out``."""
    code = 1
    try:
        with open(out, "a", encoding="utf-8") as f:
            for done, i in enumerate(indices, 1):
                result = campaign.run(i)
                f.write(json.dumps(result.as_json()) + "\n")
                f.flush()
                if result.outcome != "ok" or done % 25 == 0:
                    campaign.note(result, f"worker {os.getpid()}: {done}/{len(indices)}")
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def _run_forked_workers(campaign: Campaign, trials: int, jobs: int) -> list[TrialResult]:
    """``jobs`` forked workers share the trials round-robin; their results, in trial order."""
    workers = {}
    for w in range(jobs):
        out = campaign.work / f"worker{w}.jsonl"
        out.unlink(missing_ok=True)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            _worker(campaign, list(range(w, trials, jobs)), out)
        workers[pid] = out
    failed, results = [], []
    for pid, out in workers.items():
        if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
            failed.append(pid)
        if out.is_file():
            results += [TrialResult.from_json(json.loads(line)) for line in out.read_text().splitlines()]
    if failed:
        raise RuntimeError(f"kill-trial workers {failed} failed (their traceback is above)")
    return sorted(results, key=lambda r: r.trial)


def run_trials(trials: int, seed: int = 0, modes: tuple[str, ...] = MODES, world_size: int = 1,
               steps: int = 6, interval: int = 1, keep: int = 2, kills_per_trial: int = 1,
               workdir: str | Path | None = None, progress: bool = False, jobs: int = 1,
               warmup: bool = True, target: str = "job", pp: int = 1,
               pp_schedule: str = "Interleaved1F1B", memory_interval: int = 0,
               max_restarts: int | None = None) -> Summary:
    """Run ``trials`` kill trials, spread round-robin over ``modes``, ``jobs`` at a time; returns the summary.

    ``target``: ``job`` kills the forked ranks' process group; ``launcher`` runs each job through
    ``savepoint.launch`` (torchrun) and kills the launcher or its group (see ``tests.trials.launcher``).
    ``pp``: the job's pipeline-parallel degree (a divisor of ``world_size``), run with ``pp_schedule``.
    ``worker`` kills one worker of a job torchrun restarts (``max_restarts``, default ``kills_per_trial``; see
    ``tests.trials.restart``); ``memory_interval`` gives the job the in-memory tier.
    """
    if world_size % pp:
        raise ValueError(f"pp={pp} does not divide world_size={world_size}")
    started = time.monotonic()
    own_workdir = workdir is None
    work = Path(tempfile.mkdtemp(prefix="kill-trials-")) if own_workdir else Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    results: list[TrialResult] = []
    try:
        launcher = target in ("launcher", "worker")
        if warmup and not launcher:
            warm_up(work)
        restarts = (kills_per_trial if max_restarts is None else max_restarts) if target == "worker" else 0
        specs = {m: JobSpec(mode=m, steps=steps, interval=interval, keep=keep, world_size=world_size, pp=pp,
                            pp_schedule=pp_schedule, max_restarts=restarts, memory_interval=memory_interval)
                 for m in modes}
        refs = {m: (launcher_reference_run if launcher else reference_run)(specs[m], work) for m in modes}
        campaign = Campaign(specs, refs, modes, seed, work, kills_per_trial, target, started, progress)
        if jobs > 1:
            results = _run_forked_workers(campaign, trials, jobs)
        else:
            for i in range(trials):
                results.append(campaign.run(i))
                if results[-1].outcome != "ok" or (i + 1) % 50 == 0:
                    bad = sum(r.outcome != "ok" for r in results)
                    campaign.note(results[-1], f"{i + 1}/{trials} trials, {bad} bad")
    finally:
        if own_workdir and not any(r.outcome != "ok" for r in results):
            shutil.rmtree(work, ignore_errors=True)
    layout = {"world_size": world_size, "pp": pp, "pp_schedule": pp_schedule if pp > 1 else None,
              "memory_interval": memory_interval}
    return Summary(results, time.monotonic() - started, refs, layout)


def _modes(text: str) -> tuple[str, ...]:
    """``--mode``: ``all``, one mode or a comma-separated list of them."""
    if text == "all":
        return MODES
    modes = tuple(dict.fromkeys(m.strip() for m in text.split(",")))
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {', '.join(unknown) or repr(text)}: give all or some of "
                                         f"{', '.join(MODES)}, comma-separated")
    return modes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.trials.kill", description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", type=_modes, default=MODES, metavar="{all," + ",".join(MODES) + "}",
                   help="async mode(s) of the job: one, a comma-separated list, or all (default)")
    p.add_argument("--world-size", type=int, choices=(1, 2), default=1)
    p.add_argument("--pp", type=int, choices=(1, 2), default=1,
                   help="pipeline-parallel degree of the job (default 1; 2 needs --world-size 2)")
    p.add_argument("--pp-schedule", default="Interleaved1F1B",
                   help="--parallelism.pipeline_parallel_schedule with --pp 2 (default Interleaved1F1B)")
    p.add_argument("--steps", type=int, default=6, help="training.steps of the job (default 6)")
    p.add_argument("--interval", type=int, default=1, help="checkpoint.interval (default 1)")
    p.add_argument("--keep", type=int, default=2, help="checkpoint.keep_latest_k (default 2)")
    p.add_argument("--kills-per-trial", type=int, default=1)
    p.add_argument("--target", choices=("job", "launcher", "worker"), default="job",
                   help="job: fork the ranks and SIGKILL their process group (default); launcher: run each job "
                        "through savepoint.launch (torchrun, as ./run_train.sh does) and SIGKILL the launcher or "
                        "its process group, then require every process of the job gone within 2 s; worker: run "
                        "each job through savepoint.launch with torchrun restarts and SIGKILL one worker, then "
                        "require the job to finish by itself, bit-exact")
    p.add_argument("--memory-interval", type=int, default=0, metavar="K",
                   help="--checkpoint.memory_interval of the job (default 0: no in-memory tier)")
    p.add_argument("--max-restarts", type=int, default=None,
                   help="--target worker: torchrun's --max-restarts (default: --kills-per-trial)")
    p.add_argument("--jobs", type=int, default=1, help="trials run at a time (forked workers; default 1)")
    p.add_argument("--no-warmup", action="store_true",
                   help="do not warm up the harness process before forking (each run then starts ~1 s slower)")
    p.add_argument("--workdir", default=None, help="where trial folders go (default: a fresh temp folder)")
    p.add_argument("--json", default=None, help="also write the counts as JSON to this file")
    args = p.parse_args(argv)
    if args.world_size % args.pp:
        p.error(f"--pp {args.pp} needs a --world-size it divides (got --world-size {args.world_size})")
    modes = args.mode
    summary = run_trials(args.trials, args.seed, modes, args.world_size, args.steps, args.interval, args.keep,
                         args.kills_per_trial, args.workdir, progress=True, jobs=args.jobs,
                         warmup=not args.no_warmup, target=args.target, pp=args.pp, pp_schedule=args.pp_schedule,
                         memory_interval=args.memory_interval, max_restarts=args.max_restarts)
    return finish(summary.report(), summary.as_json(), args.json, bool(summary.bad))


if __name__ == "__main__":
    sys.exit(main())
