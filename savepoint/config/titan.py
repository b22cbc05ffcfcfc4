"""TorchTitan v0.2.2's keys that savepoint accepts without implementing them, and its aliases.

Every key of TorchTitan's config loads here. A key savepoint does not implement is refused before
launch when it differs from TorchTitan's default: one line naming the key, its value, and what to do
(``NOT_YET``). A key that only matters when a refused feature is on (``quantize.*`` without model
converters, ``validation.*`` without validation, ...) may hold any value: nothing reads it (``GATED``;
docs/coming-from-torchtitan.md lists them). Values of TorchTitan's ``Literal`` types are checked
against their choices.
"""

from __future__ import annotations

from typing import Any

from savepoint.config.job_config import JobConfig
from savepoint.config.options import Option, holder, options, value_text
from savepoint.config.problems import MAX_SEED, need, one_of

_UNSET = "leave it unset"
_OFF = "set it to false or remove it"

# dotted key -> (the feature, how to proceed). Checked only when the value differs from the default.
NOT_YET: dict[str, tuple[str, str]] = {
    "job.save_config_file": ("writing the config to a file", "remove it (every checkpoint's manifest.json and "
                             "--job.print_config hold the resolved config)"),
    "job.custom_config_module": ("extending the config with a custom module", "remove it"),
    "profiling.enable_profiling": ("the torch profiler", _OFF),
    "profiling.enable_memory_snapshot": ("CUDA memory snapshots", _OFF),
    "model.tokenizer_path": ("TorchTitan's deprecated tokenizer folder option",
                             "use --model.hf_assets_path (a folder with tokenizer.json) instead"),
    "model.converters": ("converting the model (float8, mx)", "remove it (train in full or mixed precision)"),
    "model.print_after_conversion": ("printing the model after conversion", _OFF),
    "optimizer.early_step_in_backward": ("the optimizer step in backward", _OFF),
    "lr_scheduler.total_steps": ("a schedule longer or shorter than the run", "remove it (the schedule spans "
                                 "--training.steps)"),
    "training.enable_cpu_offload": ("FSDP CPU offloading", _OFF),
    "training.dtype": ("training in bfloat16", 'set it to "float32" (--training.mixed_precision_param sets '
                       "the compute dtype on GPU)"),
    "training.gc_debug": ("garbage-collection debugging", _OFF),
    "training.dataloader.num_workers": ("data-loading worker processes", "set it to 0"),
    "training.dataloader.persistent_workers": ("persistent data-loading workers", _OFF),
    "training.dataloader.pin_memory": ("pinned-memory batches", _OFF),
    "training.dataloader.prefetch_factor": ("prefetching data-loading workers", _UNSET),
    "checkpoint.initial_load_in_hf_quantized": ("loading quantized Hugging Face weights", _OFF),
    "parallelism.fsdp_reshard_after_forward": ("an FSDP resharding policy other than the default",
                                               'set it to "default"'),
    "parallelism.disable_loss_parallel": ("turning off loss parallelism", _OFF),
    "parallelism.enable_async_tensor_parallel": ("async tensor parallelism", _OFF),
    "parallelism.expert_tensor_parallel_degree": ("expert tensor parallelism (llama3 has no experts)",
                                                  "set it to 1"),
    "comm.train_timeout_seconds": ("a separate timeout after the first step",
                                   "remove it (--comm.init_timeout_seconds applies throughout)"),
    "comm.mode": ("dry runs without real communication", 'set it to "default"'),
    "activation_checkpoint.per_op_sac_force_recompute_mm_shapes_by_fqns": (
        "forcing recomputation of chosen matmul shapes", "remove it"),
    "activation_checkpoint.early_stop": ("early-stopping recomputation", _OFF),
    "activation_checkpoint.visualize_memory_budget_pareto": ("the memory-budget plot", _OFF),
    "activation_checkpoint.preserve_rng_state": ("recomputation without restoring the RNG state", "set it to true"),
    "activation_checkpoint.determinism_check": ("torch.utils.checkpoint's determinism checks", 'set it to "default"'),
    "activation_checkpoint.debug": ("activation-checkpoint debug information", _OFF),
    "memory_estimation.enable": ("memory estimation", _OFF),
    "fault_tolerance.enable": ("fault-tolerant training (TorchFT)", _OFF),
    "experimental.custom_import": ("importing custom modules", "remove it"),
    "experimental.custom_args_module": ("extending the config with a custom module", "remove it"),
    "validation.enable": ("validation during training", _OFF),
    "debug.deterministic_warn_only": ("warn-only deterministic mode", "remove it (--debug.deterministic fails on "
                                      "an op without a deterministic kernel)"),
    "debug.moe_force_load_balance": ("MoE load balancing (llama3 has no experts)", _OFF),
}

# Keys read only when a feature above (or context/expert parallelism) is on: any value is accepted and unused.
GATED: dict[str, str] = {
    "profiling": "--profiling.enable_profiling",
    "validation": "--validation.enable",
    "quantize": "--model.converters",
    "memory_estimation": "--memory_estimation.enable",
    "fault_tolerance": "--fault_tolerance.enable",
    "checkpoint.enable_ft_dataloader_checkpoints": "--fault_tolerance.enable",
    "parallelism.context_parallel_load_balancer": "--parallelism.context_parallel_degree",
    "parallelism.context_parallel_rotate_method": "--parallelism.context_parallel_degree",
    "parallelism.expert_parallel_comm_backend": "--parallelism.expert_parallel_degree",
    "parallelism.pipeline_parallel_expert_parallel_overlap": "--parallelism.expert_parallel_degree",
    "activation_checkpoint.memory_budget": "--activation_checkpoint.mode memory_budget",
    "training.gc_freq": "nothing (Python's collector runs as usual)",
    "comm.trace_buf_size": "nothing (no flight recorder)",
    "comm.save_traces_folder": "nothing (no flight recorder)",
    "comm.save_traces_file_prefix": "nothing (no flight recorder)",
}
# Choices accepted by the type that savepoint does not run yet.
NOT_YET_CHOICES: dict[str, dict[str, tuple[str, str]]] = {
    "activation_checkpoint.mode": {"memory_budget": ("activation checkpointing by memory budget",
                                                     'choose "none", "full" or "selective"')},
}


def _unsupported(opt: Option, value: Any, feature: str, how: str) -> str:
    text = ("true" if value else "false") if opt.base is bool else value_text(opt, value)
    return f"{opt.flag}={text}: {feature} is not supported yet; {how}"


def not_yet_problems(cfg: JobConfig) -> list[str]:
    """One line for each key set to a value savepoint does not implement."""
    problems: list[str] = []
    opts = options()
    for dotted, (feature, how) in NOT_YET.items():
        section, _, name = dotted.rpartition(".")
        opt = opts[section][name]
        value = getattr(holder(cfg, section), name)
        if value != opt.default and (not opt.choices or value in opt.choices):  # else: not a choice at all
            problems.append(_unsupported(opt, value, feature, how))
    for dotted, refused in NOT_YET_CHOICES.items():
        section, _, name = dotted.rpartition(".")
        value = getattr(holder(cfg, section), name)
        if value in refused:
            problems.append(_unsupported(opts[section][name], value, *refused[value]))
    return problems


def choice_problems(cfg: JobConfig) -> list[str]:
    """Values of TorchTitan's Literal-typed keys that are none of its choices, one line each."""
    problems: list[str] = []
    for section, opts in options().items():
        values = holder(cfg, section)
        for opt in opts.values():
            value = getattr(values, opt.name)
            if opt.choices and not (value is None and opt.optional):
                problems += one_of(opt.flag, value, opt.choices)
    return problems


def titan_problems(cfg: JobConfig) -> list[str]:
    """The checks TorchTitan's own config makes, then every key set to what savepoint does not run yet."""
    par = cfg.parallelism
    problems = choice_problems(cfg)
    if par.context_parallel_load_balancer == "":
        problems.append('--parallelism.context_parallel_load_balancer="": the balancer cannot be empty; '
                        "use none to turn load balancing off")
    steps = cfg.validation.steps
    problems += need("--validation.steps", steps, steps > 0 or steps == -1, "> 0, or -1 for the whole set")
    return problems + not_yet_problems(cfg)


def alias_problems(cfg: JobConfig, explicit: set[str]) -> list[str]:
    """Make ``[debug]`` and ``[training]`` agree on the seed and determinism; refuse them set differently.

    ``explicit`` holds the dotted keys the TOML file or the command line set. Afterwards both
    spellings hold the value in force (``debug.seed`` stays none when neither seed was set).
    """
    d, t = cfg.debug, cfg.training
    both = {"debug.seed", "training.seed"} <= explicit
    if both and d.seed is not None and d.seed != t.seed:
        return [_conflict("seed", d.seed, t.seed)]
    if {"debug.deterministic", "training.deterministic"} <= explicit and d.deterministic != t.deterministic:
        return [_conflict("deterministic", d.deterministic, t.deterministic)]
    problems: list[str] = []
    if d.seed is not None:
        problems += need("--debug.seed", d.seed, 0 <= d.seed <= MAX_SEED, f"between 0 and {MAX_SEED} (2**32 - 1)")
        if not problems:
            t.seed = d.seed
    elif "training.seed" in explicit:
        d.seed = t.seed
    t.deterministic = d.deterministic = t.deterministic or d.deterministic
    return problems


def _conflict(name: str, debug_value: Any, training_value: Any) -> str:
    text = {True: "true", False: "false"}
    a, b = text.get(debug_value, debug_value), text.get(training_value, training_value)
    return (f"--debug.{name}={a} and --training.{name}={b} disagree: they are one setting ([debug] {name} is "
            f"TorchTitan's name, [training] {name} the older one); set only --debug.{name}")
