"""The parallel layout: the six ``[parallelism]`` degrees resolved against the world size.

Torch-free, so ``savepoint check`` (run by ``run_train.sh`` before any process starts) reports a
bad layout in a second, with the same message a worker would give. What the model itself allows
(tensor parallelism must divide its heads) is checked by ``savepoint.job``, which knows the models.
"""

from __future__ import annotations

from savepoint.config.job_config import JobConfig
from savepoint.errors import ConfigError, NotSupportedYet
from savepoint.parallel_dims import ParallelDims
from savepoint.pipeline_plan import PipelinePlan, plan_pipeline

P = "--parallelism."
DEGREES = (
    "data_parallel_replicate_degree",
    "data_parallel_shard_degree",
    "tensor_parallel_degree",
    "pipeline_parallel_degree",
    "context_parallel_degree",
    "expert_parallel_degree",
)
NOT_YET = {
    "context_parallel_degree": "context parallelism",
    "expert_parallel_degree": "expert parallelism (llama3 has no experts)",
}


def resolve_degrees(cfg: JobConfig, world_size: int) -> ParallelDims:
    """Check the degrees against ``world_size`` and fill ``data_parallel_shard_degree = -1``.

    Raises:
        NotSupportedYet: context or expert parallelism above 1.
        ConfigError: the degrees do not multiply to the world size, or a seed checkpoint is asked
            for with more than one process.
    """
    par = cfg.parallelism
    for name, feature in NOT_YET.items():
        if getattr(par, name) > 1:
            raise NotSupportedYet(f"{P}{name}={getattr(par, name)}: {feature} is not supported yet; set it to 1")
    problems = seed_checkpoint_problems(cfg, world_size)
    if problems:
        raise ConfigError(problems)
    rep, shard, tp = par.data_parallel_replicate_degree, par.data_parallel_shard_degree, par.tensor_parallel_degree
    pp = par.pipeline_parallel_degree
    pp_part = f"{P}pipeline_parallel_degree={pp} x " if pp > 1 else ""
    pp_named = f"pipeline_parallel_degree={pp} x " if pp > 1 else ""
    if shard == -1:
        others = pp * rep * tp
        if world_size % others:
            raise ConfigError([
                f"{pp_part}{P}data_parallel_replicate_degree={rep} x {P}tensor_parallel_degree={tp} = {others} "
                f"does not divide the world size {world_size} (NGPU={world_size}), so "
                f"{P}data_parallel_shard_degree=-1 cannot fill the rest; make the product divide {world_size}"
            ])
        shard = world_size // others
    product = pp * rep * shard * tp
    if product != world_size:
        raise ConfigError([
            f"the parallel degrees multiply to {product} ({pp_named}data_parallel_replicate_degree={rep} x "
            f"data_parallel_shard_degree={shard} x tensor_parallel_degree={tp}) but the world size is "
            f"{world_size} (NGPU={world_size}); make them multiply to {world_size}, or set "
            f"{P}data_parallel_shard_degree -1 to fill the rest"
        ])
    return ParallelDims(dp_replicate=rep, dp_shard=shard, tp=tp, world_size=world_size, pp=pp)


def seed_checkpoint_problems(cfg: JobConfig, world_size: int | None) -> list[str]:
    """A seed checkpoint is one process, every degree 1 (-1 for the shard degree resolves to 1)."""
    if not cfg.checkpoint.create_seed_checkpoint:
        return []
    flag = "--checkpoint.create_seed_checkpoint"
    problems = []
    if not cfg.checkpoint.enable:
        problems.append(f"{flag} needs --checkpoint.enable (it writes step-0 into the checkpoint folder)")
    if world_size is not None and world_size != 1:
        problems.append(f"{flag} runs in one process so that init does not depend on the layout: "
                        f"launch it with NGPU=1 (got {world_size} processes)")
    for name in DEGREES:
        degree = getattr(cfg.parallelism, name)
        if degree > 1:
            problems.append(f"{flag} needs every parallel degree 1: set {P}{name} 1 (got {degree})")
    return problems


def pipeline_plan(cfg: JobConfig, pp: int, n_layers: int) -> tuple[PipelinePlan | None, list[str]]:
    """The pipeline ``[parallelism]`` asks for at PP degree ``pp`` for a model of ``n_layers`` layers, or
    every reason it cannot run (the words ``savepoint check`` prints before launch)."""
    par = cfg.parallelism
    return plan_pipeline(
        schedule=par.pipeline_parallel_schedule, pp=pp, n_layers=n_layers,
        local_batch_size=cfg.training.local_batch_size, microbatch_size=par.pipeline_parallel_microbatch_size,
        layers_per_stage=par.pipeline_parallel_layers_per_stage,
        first_less=par.pipeline_parallel_first_stage_less_layers,
        last_less=par.pipeline_parallel_last_stage_less_layers, modules_per_stage=par.module_fqns_per_model_part)


def checked_pipeline_plan(cfg: JobConfig, pp: int, n_layers: int) -> PipelinePlan:
    """``pipeline_plan``, raising its problems.

    Raises:
        ConfigError: the pipeline cannot run.
    """
    plan, problems = pipeline_plan(cfg, pp, n_layers)
    if plan is None:
        raise ConfigError(problems)
    return plan
