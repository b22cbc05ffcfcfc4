"""The pipeline plan (torch-free): TorchTitan's stage split, the stages each PP rank runs, every refusal,
and the [parallelism] pipeline keys it reads (help, TOML and command line)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from savepoint.config import JobConfig, help_text
from savepoint.pipeline_plan import (
    LOOPED,
    RUNS,
    SINGLE_STAGE,
    V_SHAPED,
    canonical_schedule,
    default_modules,
    microbatch_problem,
    model_modules,
    module_problems,
    plan_pipeline,
    schedule_problems,
)
from tests.test_config import NO_ENV, only_problem, parse, write

P = "--parallelism."
L = [f"layers.{i}" for i in range(6)]  # the debug model's 6 layers
DEBUG = dict(n_layers=6, local_batch_size=8, microbatch_size=1, layers_per_stage=None, first_less=1, last_less=1,
             modules_per_stage=None)


def plan(schedule: str = "1F1B", pp: int = 2, **changes):
    return plan_pipeline(schedule=schedule, pp=pp, **{**DEBUG, **changes})


def problem(schedule: str = "1F1B", pp: int = 2, **changes) -> str:
    result, problems = plan(schedule, pp, **changes)
    assert result is None and len(problems) == 1, problems
    return problems[0]


# ---- default_modules: TorchTitan v0.2.2's even split -------------------------------------------

@pytest.mark.parametrize("num_stages,first,last,expected", [
    (1, 1, 1, [["tok_embeddings", *L, "norm", "output"]]),
    (2, 1, 1, [["tok_embeddings", *L[:3]], [*L[3:], "norm", "output"]]),
    (4, 1, 1, [["tok_embeddings", "layers.0"], ["layers.1", "layers.2"], ["layers.3", "layers.4"],
               ["layers.5", "norm", "output"]]),
    # 8 weighted layers over 3 stages: 3, 3, 2 (earlier stages take the remainder)
    (3, 1, 1, [["tok_embeddings", "layers.0", "layers.1"], ["layers.2", "layers.3", "layers.4"],
               ["layers.5", "norm", "output"]]),
    # 8 stages of 8 weighted layers: the embedding and the output each fill a stage
    (8, 1, 1, [["tok_embeddings"], *([layer] for layer in L), ["norm", "output"]]),
    (2, 0, 0, [["tok_embeddings", *L[:3]], [*L[3:], "norm", "output"]]),
    # the embedding weighs 3: 10 weighted layers, 5 a stage; the first stage holds 2 layers, the last 4
    (2, 3, 1, [["tok_embeddings", "layers.0", "layers.1"], [*L[2:], "norm", "output"]]),
    (2, 1, 3, [["tok_embeddings", *L[:4]], ["layers.4", "layers.5", "norm", "output"]]),
    # no weight: 6 layers, 2 a stage
    (3, 0, 0, [["tok_embeddings", "layers.0", "layers.1"], ["layers.2", "layers.3"],
               ["layers.4", "layers.5", "norm", "output"]]),
])
def test_default_modules(num_stages, first, last, expected):
    assert default_modules(num_stages, 6, first, last) == expected


@pytest.mark.parametrize("n_layers", [1, 2, 6, 7, 32])
@pytest.mark.parametrize("first,last", [(0, 0), (1, 1), (2, 1), (0, 3)])
def test_default_modules_keeps_every_module_once_in_order(n_layers, first, last):
    for num_stages in range(1, n_layers + first + last + 1):
        try:
            stages = default_modules(num_stages, n_layers, first, last)
        except ValueError:
            continue  # a weight more than a stage holds: refused below
        assert len(stages) == num_stages and all(stages)
        assert [m for stage in stages for m in stage] == model_modules(n_layers)
        if num_stages > 1:  # each stage holds its share of the weighted layers, earlier stages the remainder
            sizes = [len(s) for s in stages]
            sizes[0] += first - 1  # tok_embeddings counts as `first` layers
            sizes[-1] += last - 2  # norm + output count as `last` layers
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
            assert sum(sizes) == n_layers + first + last


def test_default_modules_refusals():
    with pytest.raises(ValueError, match=r"^9 stages is more than the model's 6 layers plus "
                                         r"--parallelism.pipeline_parallel_first_stage_less_layers=1 and "
                                         r"--parallelism.pipeline_parallel_last_stage_less_layers=1 \(8 in all\)$"):
        default_modules(9, 6, 1, 1)
    with pytest.raises(ValueError, match=r"^--parallelism.pipeline_parallel_first_stage_less_layers=8 is more than "
                                         r"the 7 layer\(s\) each of the 2 stages holds$"):
        default_modules(2, 6, 8, 1)
    with pytest.raises(ValueError, match="pipeline_parallel_last_stage_less_layers=3 is more than the 2 layer"):
        default_modules(4, 6, 1, 3)


# ---- stages_of: the stages each PP rank runs ----------------------------------------------------

@pytest.mark.parametrize("schedule,pp,layers_per_stage,expected", [
    ("1F1B", 2, None, [(0,), (1,)]),
    ("GPipe", 4, None, [(0,), (1,), (2,), (3,)]),
    ("Interleaved1F1B", 2, None, [(0, 2), (1, 3)]),
    ("LoopedBFS", 2, 1, [(0, 2, 4, 6), (1, 3, 5, 7)]),  # 8 stages of one weighted layer
    ("InterleavedZeroBubble", 4, 1, [(0, 4), (1, 5), (2, 6), (3, 7)]),
    ("ZBVZeroBubble", 2, None, [(0, 3), (1, 2)]),
    ("DualPipeV", 4, None, [(0, 7), (1, 6), (2, 5), (3, 4)]),
])
def test_stages_of(schedule, pp, layers_per_stage, expected):
    result, problems = plan(schedule, pp, layers_per_stage=layers_per_stage, local_batch_size=16)
    assert problems == [] and result is not None
    assert [result.stages_of(r) for r in range(pp)] == expected
    assert sorted(s for r in range(pp) for s in result.stages_of(r)) == list(range(result.num_stages))
    assert result.looped == (schedule not in SINGLE_STAGE)


@pytest.mark.parametrize("schedule,pp,layers_per_stage", [
    ("Interleaved1F1B", 2, None), ("LoopedBFS", 2, 1), ("InterleavedZeroBubble", 4, 1), ("ZBVZeroBubble", 2, None),
    ("DualPipeV", 4, None), ("1F1B", 4, None),
])
def test_stages_of_matches_torch(schedule, pp, layers_per_stage):
    """torch's own stage-to-rank mapping for loop and V styles gives each rank the same stages."""
    pytest.importorskip("torch")
    from torch.distributed.pipelining._utils import generate_stage_to_rank_mapping

    result, _ = plan(schedule, pp, layers_per_stage=layers_per_stage, local_batch_size=16)
    assert result is not None
    style = "v" if schedule in V_SHAPED else "loop"
    mapping = generate_stage_to_rank_mapping(pp, result.num_stages, style)
    for rank in range(pp):
        assert sorted(result.stages_of(rank)) == sorted(s for s, r in mapping.items() if r == rank)


def test_plan_contents():
    result, problems = plan("interleaved1f1b", local_batch_size=8, microbatch_size=2)
    assert problems == [] and result is not None
    assert result.schedule == "Interleaved1F1B" and result.n_microbatches == 4
    assert result.modules_per_stage == (("tok_embeddings", "layers.0"), ("layers.1", "layers.2"),
                                        ("layers.3", "layers.4"), ("layers.5", "norm", "output"))
    assert result.describe() == "Interleaved1F1B, 4 stages, 4 microbatches"
    given = [["tok_embeddings", *L[:5]], ["layers.5", "norm", "output"]]  # a split of one's own
    result, problems = plan("GPipe", modules_per_stage=given)
    assert problems == [] and result is not None and [list(s) for s in result.modules_per_stage] == given
    result, _ = plan("1F1B", layers_per_stage=4)  # ceil(8 / 4) = 2 stages
    assert result is not None and result.num_stages == 2


# ---- schedules and microbatches -----------------------------------------------------------------

def test_schedule_names():
    assert RUNS == SINGLE_STAGE + LOOPED + V_SHAPED and len(RUNS) == 7
    assert canonical_schedule("dualpipev") == "DualPipeV" and canonical_schedule("1f1b") == "1F1B"
    assert canonical_schedule("PipelineScheduleMulti") is None
    assert schedule_problems("gpipe") == []
    runs = "GPipe, 1F1B, Interleaved1F1B, LoopedBFS, InterleavedZeroBubble, ZBVZeroBubble, DualPipeV"
    assert schedule_problems("Interleaved1FB") == [
        f"{P}pipeline_parallel_schedule=Interleaved1FB is not a pipeline schedule (did you mean Interleaved1F1B?); "
        f"choose one of {runs}"]
    assert schedule_problems("zigzag") == [f"{P}pipeline_parallel_schedule=zigzag is not a pipeline schedule; "
                                           f"choose one of {runs}"]
    for base in ("PipelineScheduleSingle", "pipelineschedulemulti"):
        assert schedule_problems(base) == [f"{P}pipeline_parallel_schedule={base} is an abstract base class, not a "
                                           f"schedule; choose one of {runs}"]
    assert problem("LoopedBF") == schedule_problems("LoopedBF")[0]  # refused before anything else


@pytest.mark.parametrize("name,pp,stages,runs,refused", [
    ("1F1B", 2, 2, [2, 3, 8], [1]),
    ("1F1B", 4, 4, [4, 5], [1, 2, 3]),
    ("DualPipeV", 2, 4, [4, 5, 9], [1, 2, 3]),
    # rounds = max(1, n // pp) must divide n
    ("Interleaved1F1B", 2, 4, [1, 2, 3, 4, 6, 8, 10, 12], [5, 7, 9, 11]),
    ("InterleavedZeroBubble", 4, 8, [1, 3, 4, 7, 8, 10, 12], [9, 11, 13]),
    ("GPipe", 4, 4, [1, 2, 5], []),
    ("LoopedBFS", 2, 4, [1, 3, 5], []),
    ("ZBVZeroBubble", 2, 4, [1, 2, 3, 5], []),
])
def test_microbatch_rules(name, pp, stages, runs, refused):
    """torch 2.13's rules: 1F1B and DualPipeV need a microbatch per stage; the interleaved ones a count their
    rounds (of ``pp``) divide; GPipe, LoopedBFS and ZBVZeroBubble run any count."""
    for n in runs:
        assert microbatch_problem(name, pp, stages, n) is None, n
    for n in refused:
        assert microbatch_problem(name, pp, stages, n), n
    assert microbatch_problem("1F1B", 2, 2, 1) == "needs at least one per stage (2)"
    assert microbatch_problem("DualPipeV", 2, 4, 3) == "needs at least one per stage (4 stages)"
    assert microbatch_problem("Interleaved1F1B", 2, 4, 5) == (
        "runs them in rounds of 2 (the PP degree) and needs a count that the 2 rounds divide (e.g. 4)")


def test_microbatch_problems_in_the_plan():
    assert problem(local_batch_size=6, microbatch_size=4) == (
        f"--training.local_batch_size=6 is not divisible by {P}pipeline_parallel_microbatch_size=4; choose a "
        "microbatch size that divides the local batch")
    assert "is not divisible by" in problem(microbatch_size=0)
    assert problem(pp=4, local_batch_size=6, microbatch_size=2) == (
        f"--training.local_batch_size=6 / {P}pipeline_parallel_microbatch_size=2 gives 3 microbatch(es), but "
        f"{P}pipeline_parallel_schedule=1F1B needs at least one per stage (4); change the local batch or the "
        "microbatch size")
    assert "Interleaved1F1B runs them in rounds of 2" in problem("Interleaved1F1B", local_batch_size=7)


# ---- stage counts ------------------------------------------------------------------------------

def test_too_many_stages_for_the_model():
    assert problem("Interleaved1F1B", pp=8) == (
        f"Interleaved1F1B at {P}pipeline_parallel_degree=8 uses 16 stage(s): 16 stages is more than the model's 6 "
        f"layers plus {P}pipeline_parallel_first_stage_less_layers=1 and {P}pipeline_parallel_last_stage_less_layers"
        f"=1 (8 in all); lower {P}pipeline_parallel_degree or use 1F1B (one stage per rank)")
    assert problem("1F1B", pp=16, local_batch_size=16).endswith(f"(8 in all); lower {P}pipeline_parallel_degree")
    assert problem("GPipe", pp=2, layers_per_stage=1, first_less=2, last_less=3) == (
        f"{P}pipeline_parallel_layers_per_stage=1 gives 11 stage(s) for 6 layers: {P}pipeline_parallel_first_stage_"
        "less_layers=2 is more than the 1 layer(s) each of the 11 stages holds; raise "
        f"{P}pipeline_parallel_layers_per_stage")
    assert problem(first_less=8).startswith(f"1F1B at {P}pipeline_parallel_degree=2 uses 2 stage(s): "
                                            f"{P}pipeline_parallel_first_stage_less_layers=8 is more than")
    assert problem(layers_per_stage=0) == f"{P}pipeline_parallel_layers_per_stage=0 must be >= 1"


def test_stage_counts_the_schedule_cannot_run():
    assert problem("Interleaved1F1B", layers_per_stage=3) == (
        f"{P}pipeline_parallel_layers_per_stage=3 gives 3 stage(s) for 6 layers, which "
        f"{P}pipeline_parallel_degree=2 does not divide; make the stage count a multiple of 2")
    assert problem("1F1B", layers_per_stage=2) == (
        f"{P}pipeline_parallel_layers_per_stage=2 gives 4 stage(s) for 6 layers, 2 per PP rank, but 1F1B runs one "
        "stage per rank; use a looped schedule (Interleaved1F1B) or 2 stage(s)")
    assert problem("LoopedBFS", layers_per_stage=4) == (
        f"{P}pipeline_parallel_layers_per_stage=4 gives 2 stage(s) for 6 layers, 1 per PP rank, but LoopedBFS runs "
        "several stages per rank; use 1F1B or GPipe, or 4 stages")
    assert problem("ZBVZeroBubble", layers_per_stage=1, local_batch_size=16) == (
        f"{P}pipeline_parallel_layers_per_stage=1 gives 8 stage(s) for 6 layers, 4 per PP rank, but ZBVZeroBubble "
        "runs exactly two stages per rank")
    three = [["tok_embeddings", *L[:2]], L[2:4], [*L[4:], "norm", "output"]]
    assert problem(modules_per_stage=three) == (
        f"{P}module_fqns_per_model_part has 3 model part(s), which {P}pipeline_parallel_degree=2 does not divide; "
        "make the stage count a multiple of 2")
    four = [["tok_embeddings", "layers.0"], L[1:3], L[3:5], ["layers.5", "norm", "output"]]
    assert problem("GPipe", modules_per_stage=four) == (
        f"{P}module_fqns_per_model_part has 4 model part(s), 2 per PP rank, but GPipe runs one stage per rank; use "
        "a looped schedule (Interleaved1F1B) or 2 stage(s)")
    assert plan("Interleaved1F1B", modules_per_stage=four)[1] == []
    assert "both say how stages split the model; set only one (the other to none)" in problem(
        "Interleaved1F1B", modules_per_stage=four, layers_per_stage=2)


# ---- module_fqns_per_model_part --------------------------------------------------------------------

FLAG = f"{P}module_fqns_per_model_part"
HALVES = [["tok_embeddings", *L[:3]], [*L[3:], "norm", "output"]]


def test_a_complete_split_in_order_is_fine():
    assert module_problems(HALVES, 6) == []
    # a part runs its modules in model order, whatever order it lists them in
    assert module_problems([["layers.1", "layers.0", "tok_embeddings"], ["output", *L[2:], "norm"]], 6) == []
    assert module_problems([["tok_embeddings", *L, "norm"], ["output"]], 6) == []


def test_module_problems():
    assert module_problems([], 6) == [f"{FLAG} lists no model part; give one list of modules per stage, or none "
                                      "to split evenly"]
    assert module_problems([HALVES[0], [], HALVES[1]], 6) == [
        f"{FLAG}: model part 1 is empty; give every part at least one module"]
    # a misspelt module: its close match is not reported again as left out
    assert module_problems([HALVES[0], [*L[3:], "norm", "outputs"]], 6) == [
        f"{FLAG}: model part 1 names 'outputs', which the model does not have (did you mean output?); its modules "
        "are tok_embeddings, layers.0 .. layers.5, norm, output"]
    assert module_problems([["tok_embeddings", "layer.0", *L[1:3]], [*L[3:], "norm", "output"]], 6) == [
        f"{FLAG}: model part 0 names 'layer.0', which the model does not have (did you mean layers.0?); its modules "
        "are tok_embeddings, layers.0 .. layers.5, norm, output"]
    # the hint is a left-out module when one is close, else the closest module; a module no name is close to
    # is still left out
    assert module_problems([["tok_embeddings", "layers.9", *L[:3]], [*L[3:], "norm", "blocks"]], 6) == [
        f"{FLAG}: model part 0 names 'layers.9', which the model does not have (did you mean layers.5?); its "
        "modules are tok_embeddings, layers.0 .. layers.5, norm, output",
        f"{FLAG}: model part 1 names 'blocks', which the model does not have; its modules are tok_embeddings, "
        "layers.0 .. layers.5, norm, output",
        f"{FLAG} leaves out output; every module must be in one model part"]
    assert module_problems([HALVES[0], ["layers.2", *HALVES[1]]], 6) == [
        f"{FLAG}: 'layers.2' is in model parts 0 and 1; name each module once"]
    assert module_problems([HALVES[0], ["layers.3", "norm", "output"]], 6) == [
        f"{FLAG} leaves out layers.4, layers.5; every module must be in one model part"]
    assert "'layers.6', which the model does not have" in module_problems([HALVES[0], [*HALVES[1], "layers.6"]],
                                                                          6)[0]


@pytest.mark.parametrize("parts,first,before,part", [
    ([["tok_embeddings", *L[3:]], [*L[:3], "norm", "output"]], "layers.0", "layers.5", 0),
    ([[*L[:3], "norm", "output"], ["tok_embeddings", *L[3:]]], "tok_embeddings", "output", 0),
    ([["tok_embeddings", "layers.0"], ["layers.2", "layers.3"], ["layers.1", "layers.4"], ["layers.5", "norm",
                                                                                          "output"]],
     "layers.1", "layers.3", 1),
    ([["tok_embeddings", *L[:3], "norm"], [*L[3:], "output"]], "layers.3", "norm", 0),
])
def test_modules_out_of_model_order_across_parts(parts, first, before, part):
    """The stages run one after the other, so part s + 1 must continue where part s ends, or the layers run in
    the wrong order without any error from torch."""
    later = next(i for i, p in enumerate(parts) if first in p)
    assert module_problems(parts, 6) == [
        f"{FLAG}: model part {later} holds {first}, which comes before {before} of model part {part} in the model; "
        "list the modules in model order (tok_embeddings, layers.0 .. layers.5, norm, output), each part "
        "continuing where the one before ends"]
    assert "list the modules in model order" in problem("Interleaved1F1B" if len(parts) == 4 else "1F1B",
                                                        modules_per_stage=parts)


def test_a_repeated_module_is_not_also_out_of_order():
    parts = [["tok_embeddings", *L[:4]], ["layers.0", *L[4:], "norm", "output"]]  # layers.0 twice
    assert module_problems(parts, 6) == [f"{FLAG}: 'layers.0' is in model parts 0 and 1; name each module once"]


def test_module_and_batch_problems_together():
    """Every problem the plan finds before counting microbatches is reported at once."""
    result, problems = plan(microbatch_size=3, modules_per_stage=[HALVES[0], ["layers.3", "norm", "output"]])
    assert result is None and len(problems) == 2
    assert "is not divisible by" in problems[0] and "leaves out layers.4, layers.5" in problems[1]


# ---- refused before launch: rows of tests/test_bad_input.py ---------------------------------------

PP2 = [f"{P}pipeline_parallel_degree", "2"]
HALF = ["tok_embeddings", "layers.0", "layers.1", "layers.2"]  # the first of the two default parts


def parts(*names: list[str]) -> list[str]:
    return [FLAG, ";".join(",".join(part) for part in names)]


# name -> (NGPU, arguments of `savepoint check` on debug_model.toml (6 layers, local_batch_size 8), words of the
# one error line). tests/test_bad_input.py runs each with SAVEPOINT_WORLD_SIZE=NGPU, as run_train.sh does.
REFUSED_BEFORE_LAUNCH: dict[str, tuple[int, list[str], list[str]]] = {
    "PP, degree does not fit NGPU": (
        4, [f"{P}pipeline_parallel_degree", "3"],
        ["--parallelism.pipeline_parallel_degree=3 x", "does not divide the world size 4 (NGPU=4)"]),
    "PP, more stages than layers": (
        8, [f"{P}pipeline_parallel_degree", "8", f"{P}pipeline_parallel_schedule", "Interleaved1F1B"],
        ["Interleaved1F1B at --parallelism.pipeline_parallel_degree=8 uses 16 stage(s)",
         "more than the model's 6 layers", "use 1F1B"]),
    "PP, batch not divisible by the microbatch": (
        2, [*PP2, f"{P}pipeline_parallel_microbatch_size", "3"],
        ["--training.local_batch_size=8 is not divisible by --parallelism.pipeline_parallel_microbatch_size=3"]),
    "PP, too few microbatches for 1F1B": (
        4, [f"{P}pipeline_parallel_degree", "4", f"{P}pipeline_parallel_microbatch_size", "4"],
        ["gives 2 microbatch(es)", "1F1B needs at least one per stage (4)", "change the local batch"]),
    "PP, microbatches Interleaved1F1B cannot round": (
        2, [*PP2, f"{P}pipeline_parallel_schedule", "Interleaved1F1B", "--training.local_batch_size", "5"],
        ["gives 5 microbatch(es)", "Interleaved1F1B runs them in rounds of 2"]),
    "PP, unknown schedule": (
        2, [*PP2, f"{P}pipeline_parallel_schedule", "Interleaved1FB"],
        ["--parallelism.pipeline_parallel_schedule=Interleaved1FB is not a pipeline schedule",
         "did you mean Interleaved1F1B?"]),
    "PP, abstract schedule": (
        2, [*PP2, f"{P}pipeline_parallel_schedule", "PipelineScheduleSingle"],
        ["PipelineScheduleSingle is an abstract base class"]),
    "PP, schedule CSV": (
        2, [*PP2, f"{P}pipeline_parallel_schedule_csv", "plan.csv"],
        ["--parallelism.pipeline_parallel_schedule_csv=plan.csv", "not supported yet"]),
    "PP, module the model lacks": (
        2, [*PP2, *parts(HALF, ["layers.3", "layers.4", "layer.5", "norm", "output"])],
        ["model part 1 names 'layer.5', which the model does not have (did you mean layers.5?)"]),
    "PP, module named twice": (
        2, [*PP2, *parts(HALF, ["layers.2", "layers.3", "layers.4", "layers.5", "norm", "output"])],
        ["'layers.2' is in model parts 0 and 1; name each module once"]),
    "PP, module left out": (
        2, [*PP2, *parts(HALF, ["layers.3", "layers.5", "norm", "output"])],
        ["--parallelism.module_fqns_per_model_part leaves out layers.4"]),
    "PP, modules out of model order": (
        2, [*PP2, *parts(["tok_embeddings", "layers.3", "layers.4", "layers.5"],
                         ["layers.0", "layers.1", "layers.2", "norm", "output"])],
        ["model part 1 holds layers.0, which comes before layers.5 of model part 0",
         "list the modules in model order"]),
    "PP, part count the degree does not divide": (
        2, [*PP2, *parts(HALF, ["layers.3", "layers.4"], ["layers.5", "norm", "output"])],
        ["has 3 model part(s), which --parallelism.pipeline_parallel_degree=2 does not divide"]),
    "PP, 1F1B with two parts per rank": (
        2, [*PP2, *parts(HALF[:2], HALF[2:], ["layers.3", "layers.4"], ["layers.5", "norm", "output"])],
        ["has 4 model part(s), 2 per PP rank, but 1F1B runs one stage per rank", "Interleaved1F1B"]),
    "PP, seed checkpoint": (
        1, [*PP2, "--checkpoint.enable", "--checkpoint.create_seed_checkpoint"],
        ["--checkpoint.create_seed_checkpoint needs every parallel degree 1",
         "set --parallelism.pipeline_parallel_degree 1 (got 2)"]),
}


# ---- the config keys ----------------------------------------------------------------------------

# TorchTitan v0.2.2's [parallelism] pipeline keys, with its defaults, as --help shows them.
PP_HELP = [
    "--parallelism.pipeline_parallel_degree INT (default: 1)",
    "--parallelism.pipeline_parallel_schedule STR (default: 1F1B)",
    "--parallelism.pipeline_parallel_microbatch_size INT (default: 1)",
    "--parallelism.pipeline_parallel_layers_per_stage INT (default: none)",
    "--parallelism.pipeline_parallel_first_stage_less_layers INT (default: 1)",
    "--parallelism.pipeline_parallel_last_stage_less_layers INT (default: 1)",
    "--parallelism.module_fqns_per_model_part A,B;C,D;... (default: none)",
    '--parallelism.pipeline_parallel_schedule_csv STR (default: "")',
]


def test_help_lists_the_pipeline_keys_with_their_defaults() -> None:
    lines = [line.strip() for line in help_text().splitlines()]
    for usage in PP_HELP:
        assert usage in lines, usage
    par = JobConfig().parallelism
    assert (par.pipeline_parallel_degree, par.pipeline_parallel_schedule, par.pipeline_parallel_microbatch_size,
            par.pipeline_parallel_layers_per_stage, par.pipeline_parallel_first_stage_less_layers,
            par.pipeline_parallel_last_stage_less_layers, par.module_fqns_per_model_part,
            par.pipeline_parallel_schedule_csv) == (1, "1F1B", 1, None, 1, 1, None, "")
    shown = help_text(argv=["--parallelism.module_fqns_per_model_part", "a,b;c", "--help"], environ=NO_ENV)
    assert "--parallelism.module_fqns_per_model_part A,B;C,D;... = a,b;c (from the command line; default: none)" \
        in shown


PARTS_TOML = [HALF, ["layers.3", "layers.4", "layers.5", "norm", "output"]]


def test_pipeline_keys_from_toml_and_cli(tmp_path: Path) -> None:
    path = write(tmp_path, "[parallelism]\npipeline_parallel_degree = 2\npipeline_parallel_schedule = 'GPipe'\n"
                           f"module_fqns_per_model_part = {json.dumps(PARTS_TOML)}\n"
                           "pipeline_parallel_microbatch_size = 2\n"
                           "pipeline_parallel_first_stage_less_layers = 0\n"
                           "pipeline_parallel_last_stage_less_layers = 2\n[training]\nlocal_batch_size = 4\n")
    par = parse("--job.config_file", path).parallelism
    assert (par.pipeline_parallel_degree, par.pipeline_parallel_schedule, par.module_fqns_per_model_part) == \
        (2, "GPipe", PARTS_TOML)
    assert (par.pipeline_parallel_microbatch_size, par.pipeline_parallel_first_stage_less_layers,
            par.pipeline_parallel_last_stage_less_layers) == (2, 0, 2)
    cli = ";".join(",".join(part) for part in PARTS_TOML)
    par = parse("--parallelism.pipeline_parallel_degree=2", "--parallelism.module_fqns_per_model_part", cli,
                "--parallelism.pipeline_parallel_layers_per_stage", "none").parallelism
    assert par.module_fqns_per_model_part == PARTS_TOML and par.pipeline_parallel_layers_per_stage is None
    spaced = parse("--parallelism.module_fqns_per_model_part", " tok_embeddings , layers.0 ;; layers.1 ;")
    assert spaced.parallelism.module_fqns_per_model_part == [["tok_embeddings", "layers.0"], ["layers.1"]]
    cleared = parse("--job.config_file", path, "--parallelism.module_fqns_per_model_part", "none",
                    "--parallelism.pipeline_parallel_layers_per_stage", "4")  # 2 stages of 4 (1 + 6 + 1 layers)
    assert cleared.parallelism.module_fqns_per_model_part is None
    assert cleared.parallelism.pipeline_parallel_layers_per_stage == 4


@pytest.mark.parametrize("value", ['["tok_embeddings", "layers.0"]', '[["tok_embeddings"], "layers.0"]',
                                   '"tok_embeddings,layers.0;layers.1"', '[["tok_embeddings", 3]]'])
def test_module_fqns_of_the_wrong_toml_type(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, f"[parallelism]\nmodule_fqns_per_model_part = {value}\n")
    problem = only_problem(["--job.config_file", path])
    assert problem.startswith(f"parallelism.module_fqns_per_model_part in {path}: expected list[list[str]], got ")
    assert "\n" not in problem


def test_pipeline_values_are_checked() -> None:
    p = "--parallelism."
    for key, floor in (("microbatch_size", 1), ("layers_per_stage", 1), ("first_stage_less_layers", 0),
                       ("last_stage_less_layers", 0)):
        problem = only_problem([f"{p}pipeline_parallel_{key}", str(floor - 1)])
        assert problem.startswith(f"{p}pipeline_parallel_{key} must be >= {floor}, got {floor - 1}")
    assert "not supported yet" in only_problem([f"{p}pipeline_parallel_schedule_csv", "schedule.csv"])
    assert "did you mean Interleaved1F1B?" in only_problem([f"{p}pipeline_parallel_degree", "2",
                                                             f"{p}pipeline_parallel_schedule", "Interleavd1F1B"])
    assert parse(f"{p}pipeline_parallel_schedule", "nonsense").parallelism.pipeline_parallel_degree == 1  # PP off
    assert parse(f"{p}pipeline_parallel_degree", "2", f"{p}pipeline_parallel_schedule", "dualpipev")
