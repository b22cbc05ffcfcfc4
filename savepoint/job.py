"""A training job: its config checked against the model it names.

``savepoint.config`` describes a job without knowing any model; this module adds what the model
allows: the flavor must exist, ``--training.seq_len`` must fit its context, tensor parallelism
must divide its heads, its feed-forward size and the sequence, and a pipeline must split its layers
into stages the schedule can run with the batch's microbatches. :func:`parse_args` reports those
problems together with the config's own, in one ``ConfigError``. Torch-free, like the config, so
``savepoint check`` answers in a second.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from savepoint import config
from savepoint.config import JobConfig
from savepoint.config.layout import P, pipeline_plan, resolve_degrees, seed_checkpoint_problems
from savepoint.config.validate import need, one_of, pipeline_value_problems
from savepoint.errors import ConfigError, NotSupportedYet
from savepoint.models.llama3.args import LLAMA3_FLAVORS
from savepoint.parallel_dims import ParallelDims


def parse_args(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> JobConfig:
    """The job config from defaults, the TOML file and ``argv``, checked against its model too.

    Raises:
        ConfigError: listing every problem in the file, the command line and the values.
    """
    return config.parse_args(argv, environ, checks=(model_problems,))


def model_problems(cfg: JobConfig) -> list[str]:
    """What the named flavor forbids: an unknown flavor, a longer sequence, a TP degree that does not divide it,
    a pipeline it cannot be split into."""
    problems = one_of("--model.flavor", cfg.model.flavor, tuple(LLAMA3_FLAVORS))
    problems += _seq_len_problems(cfg.training.seq_len, cfg.model.flavor)
    problems += tensor_parallel_problems(cfg, cfg.parallelism.tensor_parallel_degree)
    # A bad PP value or batch size is the config's own problem, reported by validate already.
    if cfg.training.local_batch_size >= 1 and not pipeline_value_problems(cfg.parallelism):
        problems += pipeline_problems(cfg, cfg.parallelism.pipeline_parallel_degree)
    return problems


def _seq_len_problems(seq_len: int, flavor: str) -> list[str]:
    """At most the context the flavor's RoPE tables are built for (Llama 3.1: 131072); config checks >= 1."""
    if seq_len < 1 or flavor not in LLAMA3_FLAVORS:
        return []
    longest = LLAMA3_FLAVORS[flavor].max_seq_len
    return need("--training.seq_len", seq_len, seq_len <= longest,
                f"between 1 and {longest}, the longest context of --model.flavor {flavor}")


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


def pipeline_problems(cfg: JobConfig, pp: int) -> list[str]:
    """Why the pipeline of degree ``pp`` cannot run this flavor with this batch (none when ``pp`` is 1).

    The config's own PP values (a schedule name, counts >= 1) come first; then the stages their split
    gives the flavor's layers, the modules ``module_fqns_per_model_part`` names, and the microbatches
    the schedule needs (``savepoint.config.layout.pipeline_plan``).
    """
    if pp <= 1 or cfg.model.flavor not in LLAMA3_FLAVORS:
        return []
    problems = pipeline_value_problems(cfg.parallelism)
    if problems:
        return problems
    return pipeline_plan(cfg, pp, LLAMA3_FLAVORS[cfg.model.flavor].n_layers)[1]


def resolve_parallel_dims(cfg: JobConfig, world_size: int) -> ParallelDims:
    """Check the degrees against ``world_size`` and the model, and fill ``data_parallel_shard_degree = -1``.

    Raises:
        NotSupportedYet: context or expert parallelism above 1.
        ConfigError: the degrees do not multiply to the world size, tensor parallelism does not
            divide the model, the pipeline cannot split it or run the batch, or a seed checkpoint is
            asked for with more than one process.
    """
    dims = resolve_degrees(cfg, world_size)
    problems = tensor_parallel_problems(cfg, dims.tp) + pipeline_problems(cfg, dims.pp)
    if problems:
        raise ConfigError(problems)
    return dims


def layout_problems(cfg: JobConfig, world_size: int | None) -> list[str]:
    """Every layout problem ``resolve_parallel_dims`` would raise, as a list (for ``savepoint check``)."""
    if world_size is None:
        par = cfg.parallelism
        return (seed_checkpoint_problems(cfg, None) + tensor_parallel_problems(cfg, par.tensor_parallel_degree)
                + pipeline_problems(cfg, par.pipeline_parallel_degree))
    try:
        resolve_parallel_dims(cfg, world_size)
    except ConfigError as e:
        return list(e.problems)
    except NotSupportedYet as e:
        return [str(e)]
    return []
