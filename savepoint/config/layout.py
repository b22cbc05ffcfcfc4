"""The parallel layout: the six ``[parallelism]`` degrees resolved against the world size.

Torch-free, so ``savepoint check`` (run by ``run_train.sh`` before any process starts) reports a
bad layout in a second, with the same message a worker would give.
"""

from __future__ import annotations

from dataclasses import dataclass

from savepoint.config.job_config import JobConfig
from savepoint.errors import ConfigError, NotSupportedYet
from savepoint.models.llama3.args import LLAMA3_FLAVORS

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
    "pipeline_parallel_degree": "pipeline parallelism",
    "context_parallel_degree": "context parallelism",
    "expert_parallel_degree": "expert parallelism (llama3 has no experts)",
}


@dataclass(frozen=True)
class ParallelDims:
    """Resolved degrees; ``dp_replicate * dp_shard * tp == world_size``."""

    dp_replicate: int
    dp_shard: int
    tp: int
    world_size: int

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many different batches one step consumes."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp(self) -> bool:
        """Parameters are sharded (FSDP) or replicated-and-sharded (HSDP) over the data-parallel ranks."""
        return self.dp > 1

    def describe(self) -> str:
        parts = []
        if self.dp_replicate > 1:
            parts.append(f"HSDP {self.dp_replicate}x{self.dp_shard}")
        elif self.dp_shard > 1:
            parts.append(f"FSDP {self.dp_shard}")
        if self.tp > 1:
            parts.append(f"TP {self.tp}")
        return " + ".join(parts) or "1 process"

    def as_dict(self) -> dict[str, int]:
        return {"data_parallel_replicate_degree": self.dp_replicate, "data_parallel_shard_degree": self.dp_shard,
                "tensor_parallel_degree": self.tp, "world_size": self.world_size}


def resolve_parallel_dims(cfg: JobConfig, world_size: int) -> ParallelDims:
    """Check the degrees against ``world_size`` and the model, and fill ``data_parallel_shard_degree = -1``.

    Raises:
        NotSupportedYet: pipeline, context or expert parallelism above 1.
        ConfigError: the degrees do not multiply to the world size, tensor parallelism does not
            divide the model, or a seed checkpoint is asked for with more than one process.
    """
    par = cfg.parallelism
    for name, feature in NOT_YET.items():
        if getattr(par, name) > 1:
            raise NotSupportedYet(f"{P}{name}={getattr(par, name)}: {feature} is not supported yet; set it to 1")
    problems = seed_checkpoint_problems(cfg, world_size)
    if problems:
        raise ConfigError(problems)
    rep, shard, tp = par.data_parallel_replicate_degree, par.data_parallel_shard_degree, par.tensor_parallel_degree
    if shard == -1:
        others = rep * tp
        if world_size % others:
            raise ConfigError([
                f"{P}data_parallel_replicate_degree={rep} x {P}tensor_parallel_degree={tp} = {others} does "
                f"not divide the world size {world_size} (NGPU={world_size}), so "
                f"{P}data_parallel_shard_degree=-1 cannot fill the rest; make the product divide {world_size}"
            ])
        shard = world_size // others
    product = rep * shard * tp
    if product != world_size:
        raise ConfigError([
            f"the parallel degrees multiply to {product} (data_parallel_replicate_degree={rep} x "
            f"data_parallel_shard_degree={shard} x tensor_parallel_degree={tp}) but the world size is "
            f"{world_size} (NGPU={world_size}); make them multiply to {world_size}, or set "
            f"{P}data_parallel_shard_degree -1 to fill the rest"
        ])
    problems = tensor_parallel_problems(cfg, tp)
    if problems:
        raise ConfigError(problems)
    return ParallelDims(dp_replicate=rep, dp_shard=shard, tp=tp, world_size=world_size)


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


def tensor_parallel_problems(cfg: JobConfig, tp: int) -> list[str]:
    """Tensor parallelism splits heads, the SwiGLU hidden size and (sequence parallel) the sequence."""
    if tp <= 1 or cfg.model.flavor not in LLAMA3_FLAVORS:
        return []
    args = LLAMA3_FLAVORS[cfg.model.flavor]
    flag = f"{P}tensor_parallel_degree={tp}"
    sizes = {
        f"the attention head count (n_heads={args.n_heads} in flavor {cfg.model.flavor})": args.n_heads,
        f"the key/value head count (n_kv_heads={args.num_kv_heads} in flavor {cfg.model.flavor})":
            args.num_kv_heads,
        f"the feed-forward hidden size ({args.ffn_hidden_dim} in flavor {cfg.model.flavor})": args.ffn_hidden_dim,
        f"--training.seq_len={cfg.training.seq_len} (sequence parallelism splits the sequence)":
            cfg.training.seq_len,
    }
    return [f"{flag} does not divide {what}; choose a degree that divides it"
            for what, size in sizes.items() if size % tp]


def layout_problems(cfg: JobConfig, world_size: int | None) -> list[str]:
    """Every layout problem ``resolve_parallel_dims`` would raise, as a list (for ``savepoint check``)."""
    if world_size is None:
        tp = cfg.parallelism.tensor_parallel_degree
        return seed_checkpoint_problems(cfg, None) + tensor_parallel_problems(cfg, tp)
    try:
        resolve_parallel_dims(cfg, world_size)
    except ConfigError as e:
        return list(e.problems)
    except NotSupportedYet as e:
        return [str(e)]
    return []
