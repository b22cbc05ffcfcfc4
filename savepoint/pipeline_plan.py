"""How pipeline parallelism splits a model: schedules, stage counts and each stage's modules.

Torch-free, so ``savepoint check`` (and the config layer) can refuse a pipeline that cannot run
before any process starts, with the same words a worker would use. The runtime that builds the
stages and runs the schedule is ``savepoint.pipelining``.

The rules follow TorchTitan v0.2.2:

- A single-stage schedule (``GPipe``, ``1F1B``) gives each PP rank one stage; a looped one
  (``Interleaved1F1B``, ...) gives it two, unless ``pipeline_parallel_layers_per_stage`` says how
  many layers a stage holds (then ``ceil((layers + first_less + last_less) / layers_per_stage)``
  stages, which the PP degree must divide).
- The embedding counts as ``first_stage_less_layers`` layers and the final norm and output as
  ``last_stage_less_layers`` layers; the layers are then dealt out evenly, earlier stages taking
  the remainder.
- Looped schedules place stage ``s`` on PP rank ``s % pp``; the V-shaped ones (``ZBVZeroBubble``,
  ``DualPipeV``) place stages ``r`` and ``2 * pp - 1 - r`` on rank ``r``.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass

P = "--parallelism."

# torch.distributed.pipelining's schedule names (``get_schedule_class``), by kind.
SINGLE_STAGE = ("GPipe", "1F1B")
LOOPED = ("Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble")
V_SHAPED = ("ZBVZeroBubble", "DualPipeV")
RUNS = SINGLE_STAGE + LOOPED + V_SHAPED
# Names torch accepts that are not schedules one can train with.
REFUSED = {
    "PipelineScheduleSingle": "an abstract base class, not a schedule",
    "PipelineScheduleMulti": "an abstract base class, not a schedule",
}


def canonical_schedule(name: str) -> str | None:
    """The schedule's canonical spelling (torch matches names case-insensitively), or None if it does not run."""
    for known in RUNS:
        if known.lower() == name.lower():
            return known
    return None


def schedule_problems(name: str) -> list[str]:
    """An unknown or non-runnable schedule name, with the closest runnable one."""
    if canonical_schedule(name) is not None:
        return []
    flag = f"{P}pipeline_parallel_schedule={name}"
    runs = ", ".join(RUNS)
    base = {k.lower(): v for k, v in REFUSED.items()}.get(name.lower())
    if base is not None:
        return [f"{flag} is {base}; choose one of {runs}"]
    close = difflib.get_close_matches(name.lower(), [r.lower() for r in RUNS], n=1, cutoff=0.5)
    hint = f" (did you mean {next(r for r in RUNS if r.lower() == close[0])}?)" if close else ""
    return [f"{flag} is not a pipeline schedule{hint}; choose one of {runs}"]


@dataclass(frozen=True)
class PipelinePlan:
    """Which modules each stage holds and which stages each PP rank runs."""

    schedule: str
    pp: int
    modules_per_stage: tuple[tuple[str, ...], ...]
    n_microbatches: int

    @property
    def num_stages(self) -> int:
        return len(self.modules_per_stage)

    @property
    def looped(self) -> bool:
        """Whether the schedule runs several stages per rank (``PipelineScheduleMulti``)."""
        return self.schedule not in SINGLE_STAGE

    def stages_of(self, pp_rank: int) -> tuple[int, ...]:
        """The stage indices PP rank ``pp_rank`` runs, in the order the schedule expects."""
        per_rank = self.num_stages // self.pp
        if self.schedule in V_SHAPED:
            return (pp_rank, self.num_stages - 1 - pp_rank)
        return tuple(pp_rank + s * self.pp for s in range(per_rank))

    def describe(self) -> str:
        return f"{self.schedule}, {self.num_stages} stages, {self.n_microbatches} microbatches"


def default_modules(num_stages: int, n_layers: int, first_less: int, last_less: int) -> list[list[str]]:
    """TorchTitan's even split of ``tok_embeddings``, ``layers.0..n-1``, ``norm`` and ``output`` into stages.

    Raises:
        ValueError: more stages than the weighted layers (a stage would be empty), or the
            embedding/output weight is more than a stage holds.
    """
    if num_stages == 1:
        return [["tok_embeddings", *(f"layers.{i}" for i in range(n_layers)), "norm", "output"]]
    effective = n_layers + first_less + last_less
    if num_stages > effective:
        raise ValueError(f"{num_stages} stages is more than the model's {n_layers} layers plus "
                         f"{P}pipeline_parallel_first_stage_less_layers={first_less} and "
                         f"{P}pipeline_parallel_last_stage_less_layers={last_less} ({effective} in all)")
    per_stage, extra = divmod(effective, num_stages)
    for flag, weight in (("first", first_less), ("last", last_less)):
        if weight > per_stage:
            raise ValueError(f"{P}pipeline_parallel_{flag}_stage_less_layers={weight} is more than the "
                             f"{per_stage} layer(s) each of the {num_stages} stages holds")
    stages: list[list[str]] = []
    layer = 0
    for s in range(num_stages):
        room = per_stage + (1 if s < extra else 0)
        modules = []
        if s == 0:
            modules.append("tok_embeddings")
            room -= first_less
        elif s == num_stages - 1:
            room -= last_less
        for _ in range(room):
            if layer < n_layers:
                modules.append(f"layers.{layer}")
                layer += 1
        if s == num_stages - 1:
            modules += ["norm", "output"]
        stages.append(modules)
    return stages


def module_problems(modules_per_stage: Sequence[Sequence[str]], n_layers: int) -> list[str]:
    """``module_fqns_per_model_part`` must name every top-level module and layer once, nothing else, and
    in model order across the parts (part ``s + 1`` continues where part ``s`` ends)."""
    flag = f"{P}module_fqns_per_model_part"
    every = model_modules(n_layers)
    known = f"tok_embeddings, layers.0 .. layers.{n_layers - 1}, norm, output"
    if not modules_per_stage:
        return [f"{flag} lists no model part; give one list of modules per stage, or none to split evenly"]
    seen: dict[str, int] = {}
    unknown: list[tuple[int, str]] = []
    problems = []
    for s, stage in enumerate(modules_per_stage):
        if not stage:
            problems.append(f"{flag}: model part {s} is empty; give every part at least one module")
        for name in stage:
            if name not in every:
                unknown.append((s, name))
            elif name in seen:
                problems.append(f"{flag}: {name!r} is in model parts {seen[name]} and {s}; name each module once")
            else:
                seen[name] = s
    missing = [name for name in every if name not in seen]
    for s, name in unknown:  # a misspelt name's close match among the left-out ones is not reported again
        close = difflib.get_close_matches(name, missing, n=1) or difflib.get_close_matches(name, every, n=1)
        if close and close[0] in missing:
            missing.remove(close[0])
        hint = f" (did you mean {close[0]}?)" if close else ""
        problems.append(f"{flag}: model part {s} names {name!r}, which the model does not have{hint}; "
                        f"its modules are {known}")
    if missing:
        problems.append(f"{flag} leaves out {', '.join(missing)}; every module must be in one model part")
    return problems + _order_problems(modules_per_stage, seen, every, flag)


def model_modules(n_layers: int) -> list[str]:
    """The llama3 model's top-level modules and layers, in the order its forward runs them."""
    return ["tok_embeddings", *(f"layers.{i}" for i in range(n_layers)), "norm", "output"]


def _order_problems(modules_per_stage: Sequence[Sequence[str]], seen: dict[str, int], every: list[str],
                    flag: str) -> list[str]:
    """The first module that comes, in the model, before a module of an earlier part (a stage runs its
    modules in model order, but the stages run one after the other, so the parts must too)."""
    position = {name: i for i, name in enumerate(every)}
    latest: tuple[str, int] | None = None  # the module furthest into the model so far, and its part
    for s, stage in enumerate(modules_per_stage):
        names = [n for n in stage if seen.get(n) == s]  # unknown and repeated names are reported already
        if not names:
            continue
        first = min(names, key=position.__getitem__)
        if latest is not None and position[first] < position[latest[0]]:
            return [f"{flag}: model part {s} holds {first}, which comes before {latest[0]} of model part "
                    f"{latest[1]} in the model; list the modules in model order ({every[0]}, layers.0 .. "
                    f"layers.{len(every) - 4}, norm, output), each part continuing where the one before ends"]
        last = max(names, key=position.__getitem__)
        if latest is None or position[last] > position[latest[0]]:
            latest = (last, s)
    return []


def plan_pipeline(*, schedule: str, pp: int, n_layers: int, local_batch_size: int, microbatch_size: int,
                  layers_per_stage: int | None, first_less: int, last_less: int,
                  modules_per_stage: Sequence[Sequence[str]] | None) -> tuple[PipelinePlan | None, list[str]]:
    """The pipeline a PP degree ``pp`` gives this model and batch, or every reason it cannot run."""
    problems = schedule_problems(schedule)
    if problems:
        return None, problems
    name = canonical_schedule(schedule)
    assert name is not None
    if microbatch_size < 1 or local_batch_size % microbatch_size:
        problems.append(f"--training.local_batch_size={local_batch_size} is not divisible by "
                        f"{P}pipeline_parallel_microbatch_size={microbatch_size}; choose a microbatch size that "
                        "divides the local batch")
    if modules_per_stage is not None:
        stages = [list(s) for s in modules_per_stage]
        problems += module_problems(stages, n_layers)
        if layers_per_stage is not None:
            problems.append(f"{P}pipeline_parallel_layers_per_stage={layers_per_stage} and "
                            f"{P}module_fqns_per_model_part both say how stages split the model; set only one "
                            "(the other to none)")
        if not stages:
            return None, problems
        source = f"{P}module_fqns_per_model_part has {len(stages)} model part(s)"
    else:
        split, source = _even_split(name, pp, n_layers, layers_per_stage, first_less, last_less)
        if isinstance(split, str):
            return None, problems + [split]
        stages = split
    problems += _stage_count_problems(name, pp, len(stages), source)
    if problems:
        return None, problems
    n_micro = local_batch_size // microbatch_size
    problem = microbatch_problem(name, pp, len(stages), n_micro)
    if problem:
        return None, [f"--training.local_batch_size={local_batch_size} / {P}pipeline_parallel_microbatch_size="
                      f"{microbatch_size} gives {n_micro} microbatch(es), but {P}pipeline_parallel_schedule={name} "
                      f"{problem}; change the local batch or the microbatch size"]
    return PipelinePlan(name, pp, tuple(tuple(s) for s in stages), n_micro), []


def _even_split(name: str, pp: int, n_layers: int, layers_per_stage: int | None, first_less: int,
                last_less: int) -> tuple[list[list[str]] | str, str]:
    """TorchTitan's stage count and even split, or the one problem that prevents it; and where the count came from."""
    if layers_per_stage is not None:
        if layers_per_stage < 1:
            return f"{P}pipeline_parallel_layers_per_stage={layers_per_stage} must be >= 1", ""
        num = math.ceil((n_layers + first_less + last_less) / layers_per_stage)
        source = (f"{P}pipeline_parallel_layers_per_stage={layers_per_stage} gives {num} stage(s) for "
                  f"{n_layers} layers")
        fix = f"raise {P}pipeline_parallel_layers_per_stage"
    else:
        num = pp * (1 if name in SINGLE_STAGE else 2)
        source = f"{name} at {P}pipeline_parallel_degree={pp} uses {num} stage(s)"
        fix = f"lower {P}pipeline_parallel_degree"
        if name not in SINGLE_STAGE:
            fix += " or use 1F1B (one stage per rank)"
    try:
        return default_modules(num, n_layers, first_less, last_less), source
    except ValueError as e:
        return f"{source}: {e}; {fix}", source


def microbatch_problem(name: str, pp: int, num_stages: int, n_micro: int) -> str | None:
    """What ``name`` needs of the microbatch count that ``n_micro`` lacks (torch 2.13's rules), or None."""
    if name == "1F1B" and n_micro < num_stages:
        return f"needs at least one per stage ({num_stages})"
    if name == "DualPipeV" and n_micro < num_stages:
        return f"needs at least one per stage ({num_stages} stages)"
    if name in ("Interleaved1F1B", "InterleavedZeroBubble"):
        rounds = max(1, n_micro // pp)
        if n_micro % rounds:
            return (f"runs them in rounds of {pp} (the PP degree) and needs a count that the {rounds} rounds divide "
                    f"(e.g. {rounds * pp})")
    return None


def _stage_count_problems(name: str, pp: int, num: int, source: str) -> list[str]:
    if num % pp:
        return [f"{source}, which {P}pipeline_parallel_degree={pp} does not divide; make the stage count a "
                f"multiple of {pp}"]
    per_rank = num // pp
    if name in SINGLE_STAGE and per_rank != 1:
        return [f"{source}, {per_rank} per PP rank, but {name} runs one stage per rank; use a looped schedule "
                f"(Interleaved1F1B) or {pp} stage(s)"]
    if name not in SINGLE_STAGE and per_rank < 2:
        return [f"{source}, {per_rank} per PP rank, but {name} runs several stages per rank; use 1F1B or GPipe, "
                f"or {2 * pp} stages"]
    if name in V_SHAPED and per_rank != 2:
        return [f"{source}, {per_rank} per PP rank, but {name} runs exactly two stages per rank"]
    return []
