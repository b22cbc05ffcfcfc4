"""Semantic checks on a typed ``JobConfig``: ranges, choices and options that need each other.

``validate`` also normalises a few values in place (``async_mode`` case, the ``data_loader``
spelling in ``exclude_from_loading``) so that later code sees one spelling.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from pathlib import Path

from savepoint.config.job_config import (
    Checkpoint,
    Comm,
    JobConfig,
    LRScheduler,
    Metrics,
    Model,
    Optimizer,
    Parallelism,
    Training,
)
from savepoint.config.layout import seed_checkpoint_problems
from savepoint.config.problems import MAX_SEED, need, one_of, url_problem
from savepoint.config.titan import titan_problems
from savepoint.dtypes import FLOAT_DTYPES
from savepoint.pipeline_plan import schedule_problems

ASYNC_MODES = ("disabled", "async", "async_with_pinned_mem")
LOADABLE_STATES = ("optimizer", "lr_scheduler", "dataloader", "train_state")
# TorchTitan's docs spell the dataloader state "data_loader"; accept that spelling.
STATE_ALIASES = {"data_loader": "dataloader"}
OPTIMIZER_IMPLEMENTATIONS = ("for-loop", "foreach", "fused")
DECAY_TYPES = ("linear", "sqrt", "cosine")


def _finite(value: float) -> bool:
    return math.isfinite(value)


def _exclude_problems(ckpt: Checkpoint) -> list[str]:
    """Check exclude_from_loading, mapping aliases and dropping duplicates in place."""
    flag = "--checkpoint.exclude_from_loading"
    problems: list[str] = []
    names: list[str] = []
    for raw in ckpt.exclude_from_loading:
        name = STATE_ALIASES.get(raw.strip(), raw.strip())
        if name not in names:
            names.append(name)
        if name == "model":
            problems.append(
                f"{flag} contains 'model': model weights are always loaded; remove it "
                "(to start from other weights, use --checkpoint.initial_load_path)"
            )
        elif name not in LOADABLE_STATES:
            known = list(LOADABLE_STATES) + list(STATE_ALIASES)
            match = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {STATE_ALIASES.get(match[0], match[0])}?" if match else ""
            problems.append(
                f"{flag} contains unknown state {raw!r}: choose from "
                f"{', '.join(LOADABLE_STATES)}{hint}"
            )
    ckpt.exclude_from_loading = names
    return problems


def _checkpoint_problems(ckpt: Checkpoint) -> list[str]:
    ckpt.async_mode = str(ckpt.async_mode).strip().lower()
    p = "--checkpoint."
    problems = need(f"{p}interval", ckpt.interval, ckpt.interval >= 1, ">= 1 (save every N steps)")
    problems += need(
        f"{p}keep_latest_k", ckpt.keep_latest_k, ckpt.keep_latest_k >= 0, ">= 0 (0 keeps all)"
    )
    problems += need(
        f"{p}load_step", ckpt.load_step, ckpt.load_step >= -1, ">= -1 (-1 loads the latest step)"
    )
    problems += need(f"{p}folder", ckpt.folder, bool(ckpt.folder.strip()), "a non-blank path")
    problems += need(f"{p}preemption_grace_seconds", ckpt.preemption_grace_seconds,
                      _finite(ckpt.preemption_grace_seconds) and ckpt.preemption_grace_seconds > 0,
                      "finite and > 0 (seconds to save after SIGTERM)")
    problems += need(f"{p}memory_interval", ckpt.memory_interval, ckpt.memory_interval >= 0,
                      ">= 0 (save to memory every N steps; 0 turns the in-memory tier off)")
    problems += need(f"{p}memory_keep_latest_k", ckpt.memory_keep_latest_k, ckpt.memory_keep_latest_k >= 1,
                      ">= 1 (in-memory steps kept per rank)")
    problems += need(f"{p}memory_folder", ckpt.memory_folder, bool(ckpt.memory_folder.strip()), "a non-blank path")
    problems += one_of(f"{p}export_dtype", ckpt.export_dtype, FLOAT_DTYPES)
    problems += one_of(f"{p}async_mode", ckpt.async_mode, ASYNC_MODES)
    problems += _exclude_problems(ckpt)
    if ckpt.last_save_in_hf and not ckpt.last_save_model_only:
        problems.append(
            f"{p}last_save_in_hf needs {p}last_save_model_only (a Hugging Face export holds only "
            f"model weights): drop {p}no_last_save_model_only or set last_save_model_only = true"
        )
    if ckpt.load_step >= 0 and not ckpt.enable:
        problems.append(
            f"{p}load_step={ckpt.load_step} asks for a load but checkpointing is off: "
            f"add {p}enable (or enable = true under [checkpoint])"
        )
    if ckpt.memory_interval > 0 and (not ckpt.enable or ckpt.load_only):
        why = "checkpointing is off" if not ckpt.enable else f"{p}load_only saves nothing"
        problems.append(
            f"{p}memory_interval={ckpt.memory_interval} asks for in-memory saves but {why}: "
            f"add {p}enable (and drop {p}load_only), or set {p}memory_interval 0"
        )
    if ckpt.initial_load_in_hf and not ckpt.initial_load_model_only:
        problems.append(
            f"{p}initial_load_in_hf needs {p}initial_load_model_only (a Hugging Face folder holds "
            f"only model weights): drop {p}no_initial_load_model_only or set "
            "initial_load_model_only = true"
        )
    return problems


def _model_problems(model: Model) -> list[str]:
    """The model family; its flavor, and what the flavor allows, are checked by ``savepoint.job``."""
    return one_of("--model.name", model.name, ("llama3",))


def _training_problems(t: Training) -> list[str]:
    p = "--training."
    problems = need(f"{p}steps", t.steps, t.steps >= 1, ">= 1")
    problems += need(f"{p}local_batch_size", t.local_batch_size, t.local_batch_size >= 1, ">= 1")
    problems += need(f"{p}seq_len", t.seq_len, t.seq_len >= 1, ">= 1")  # the upper bound is the flavor's
    problems += need(f"{p}max_norm", t.max_norm, _finite(t.max_norm) and t.max_norm >= 0,
                      "finite and >= 0 (0 disables clipping)")
    problems += need(f"{p}seed", t.seed, 0 <= t.seed <= MAX_SEED, f"between 0 and {MAX_SEED} (2**32 - 1)")
    problems += one_of(f"{p}mixed_precision_param", t.mixed_precision_param, ("bfloat16", "float32"))
    problems += one_of(f"{p}mixed_precision_reduce", t.mixed_precision_reduce, ("float32", "bfloat16"))
    return problems


def _optimizer_problems(opt: Optimizer) -> list[str]:
    o = "--optimizer."
    problems = one_of(f"{o}name", opt.name, ("AdamW",))
    problems += need(f"{o}lr", opt.lr, _finite(opt.lr) and opt.lr > 0, "finite and > 0")
    for name in ("beta1", "beta2"):
        beta = getattr(opt, name)
        problems += need(f"{o}{name}", beta, 0 <= beta < 1, "in [0, 1) (AdamW's moment decay)")
    problems += need(f"{o}eps", opt.eps, _finite(opt.eps) and opt.eps > 0, "finite and > 0")
    problems += need(f"{o}weight_decay", opt.weight_decay, _finite(opt.weight_decay) and opt.weight_decay >= 0,
                      "finite and >= 0 (0 disables weight decay)")
    problems += one_of(
        "--optimizer.implementation", opt.implementation, OPTIMIZER_IMPLEMENTATIONS
    )
    return problems


def _lr_scheduler_problems(s: LRScheduler) -> list[str]:
    p = "--lr_scheduler."
    problems = need(f"{p}warmup_steps", s.warmup_steps, s.warmup_steps >= 0, ">= 0")
    problems += one_of(f"{p}decay_type", s.decay_type, DECAY_TYPES)
    ratio_ok = s.decay_ratio is None or 0 <= s.decay_ratio <= 1
    problems += need(f"{p}decay_ratio", s.decay_ratio, ratio_ok, "none or between 0 and 1")
    problems += need(
        f"{p}min_lr_factor", s.min_lr_factor, 0 <= s.min_lr_factor <= 1, "between 0 and 1"
    )
    return problems


def _parallelism_problems(par: Parallelism) -> list[str]:
    problems: list[str] = []
    p = "--parallelism."
    for f in dataclasses.fields(par):
        if not f.name.endswith("_degree"):
            continue
        degree = getattr(par, f.name)
        if f.name == "data_parallel_shard_degree":
            ok, requirement = degree == -1 or degree >= 1, "-1 (fill the rest) or >= 1"
        else:
            ok, requirement = degree >= 1, ">= 1"
        problems += need(f"{p}{f.name}", degree, ok, requirement)
    return problems + pipeline_value_problems(par)


# Pipeline options that are counts: the smallest value each takes.
PP_COUNTS = {
    "pipeline_parallel_microbatch_size": 1,
    "pipeline_parallel_layers_per_stage": 1,
    "pipeline_parallel_first_stage_less_layers": 0,
    "pipeline_parallel_last_stage_less_layers": 0,
}


def pipeline_value_problems(par: Parallelism) -> list[str]:
    """The PP options on their own: counts in range, no schedule CSV, and (with PP on) a schedule torch runs.

    What they give a model (its stages, the microbatches a schedule needs) is ``savepoint.job``'s check.
    """
    p = "--parallelism."
    problems: list[str] = []
    for name, floor in PP_COUNTS.items():
        value = getattr(par, name)  # layers_per_stage may be None (split by the schedule)
        problems += need(f"{p}{name}", value, value is None or value >= floor, f">= {floor}")
    if par.pipeline_parallel_schedule_csv:
        problems.append(f"{p}pipeline_parallel_schedule_csv={par.pipeline_parallel_schedule_csv}: schedules from "
                        "a CSV file are not supported yet; leave it empty and name one with "
                        f"{p}pipeline_parallel_schedule")
    if par.pipeline_parallel_degree > 1:
        problems += schedule_problems(par.pipeline_parallel_schedule)
    return problems


def _comm_problems(c: Comm) -> list[str]:
    c.backend = str(c.backend).strip().lower()
    problems = one_of("--comm.backend", c.backend, ("auto", "gloo", "nccl"))
    problems += need("--comm.init_timeout_seconds", c.init_timeout_seconds, c.init_timeout_seconds >= 1, ">= 1")
    return problems


def dump_folder_problems(folder: str) -> list[str]:
    """The dump folder can exist: no part of it is a file, and the deepest existing folder is writable.

    Only what can be told without creating anything; ``MetricsLog`` reports a folder that still
    cannot be created (``/proc/x``) when training starts.
    """
    flag = "--job.dump_folder"
    if not folder.strip():
        return need(flag, folder, False, "a non-blank path")
    path = Path(folder).absolute()
    for part in (path, *path.parents):
        try:
            # exists() first: another rank may create the folder meanwhile, which turns a missing
            # path into a folder; the other order would see it missing, then present: "a file".
            exists = part.exists()
            is_dir = exists and part.is_dir()
        except OSError as e:
            return [f"{flag}={folder}: cannot look at {part} ({e.strerror}); choose another folder"]
        if exists and not is_dir:
            return [f"{flag}={folder}: {part} is a file, not a folder; choose another --job.dump_folder"]
        if is_dir:
            if not os.access(part, os.W_OK | os.X_OK):
                return [f"{flag}={folder}: {part} is not writable; choose a folder you can write to"]
            return []
    return []


def _metrics_problems(m: Metrics) -> list[str]:
    return need("--metrics.log_freq", m.log_freq, m.log_freq >= 1, ">= 1")


def _ac_compile_problems(cfg: JobConfig) -> list[str]:
    """The selective option is 'op' or a block count; compile knows the model and the loss (mode: a Literal)."""
    ac, comp = cfg.activation_checkpoint, cfg.compile
    option = ac.selective_ac_option
    problems = []
    if ac.mode == "selective" and option != "op" and not (option.isdigit() and int(option) >= 1):
        problems.append(f"--activation_checkpoint.selective_ac_option is {option!r}; use 'op' or a positive "
                        "integer N (checkpoint every N-th block)")
    unknown = [c for c in comp.components if c not in ("model", "loss")]
    if unknown:
        problems.append(f"--compile.components has {', '.join(map(repr, unknown))}; use 'model' and/or 'loss'")
    return problems


def _path_problems(cfg: JobConfig) -> list[str]:
    """Every path option is a path, not a URL; the dump folder can be created."""
    paths = {"--job.dump_folder": cfg.job.dump_folder, "--checkpoint.folder": cfg.checkpoint.folder,
             "--checkpoint.initial_load_path": cfg.checkpoint.initial_load_path,
             "--checkpoint.memory_folder": cfg.checkpoint.memory_folder,
             "--model.hf_assets_path": cfg.model.hf_assets_path, "--training.dataset_path": cfg.training.dataset_path}
    remote = ("--checkpoint.folder", "--checkpoint.initial_load_path")
    dump = paths.pop("--job.dump_folder")
    problems = [line for flag, value in paths.items() for line in url_problem(flag, value, s3=flag in remote)]
    if url_problem("--job.dump_folder", dump):
        problems.append(f"--job.dump_folder={dump}: the dump folder holds the job's logs (metrics.jsonl, TensorBoard, "
                        "profiler traces) and must be a local or shared-filesystem path; put the checkpoints on the "
                        "object store with --checkpoint.folder s3://<bucket>/<prefix> instead")
    if str(cfg.checkpoint.folder).startswith("s3://") and cfg.checkpoint.memory_interval > 0:
        problems.append(f"--checkpoint.memory_interval={cfg.checkpoint.memory_interval} with --checkpoint.folder="
                        f"{cfg.checkpoint.folder}: the in-memory tier is not supported with an s3:// folder yet; "
                        "set --checkpoint.memory_interval 0, or use a shared-filesystem folder")
    if not url_problem("--job.dump_folder", cfg.job.dump_folder):
        problems += dump_folder_problems(cfg.job.dump_folder)
    return problems


def validate(cfg: JobConfig) -> list[str]:
    """Return every semantic problem in ``cfg``; normalise values in place.

    Values are assumed well typed (``parse_args`` guarantees it). Normalises
    ``checkpoint.async_mode`` to lower case and ``checkpoint.exclude_from_loading``
    to canonical, de-duplicated state names. What depends on the model (the flavor, and the
    sequence length and tensor-parallel degree it allows) is checked by ``savepoint.job``.
    """
    return (
        _checkpoint_problems(cfg.checkpoint)
        + _model_problems(cfg.model)
        + _path_problems(cfg)
        + _training_problems(cfg.training)
        + _optimizer_problems(cfg.optimizer)
        + _lr_scheduler_problems(cfg.lr_scheduler)
        + _parallelism_problems(cfg.parallelism)
        + _metrics_problems(cfg.metrics)
        + _comm_problems(cfg.comm)
        + seed_checkpoint_problems(cfg, world_size=None)
        + _ac_compile_problems(cfg)
        + titan_problems(cfg)
    )
