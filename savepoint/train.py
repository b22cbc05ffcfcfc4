"""The training loop: build the parts from the config, resume, train, checkpoint.

The loop calls the checkpoint manager at fixed points: ``load`` once before the first step, and
``step_done`` after every step: the manager decides whether the step is due for a save, commits
finished async saves, and writes the preemption checkpoint when some rank got SIGTERM.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from savepoint.checkpoint import CheckpointManager
from savepoint.checkpoint.states import (
    DATALOADER,
    LR_SCHEDULER,
    OPTIMIZER,
    TRAIN_STATE,
    LRSchedulerState,
    OptimizerState,
    TrainState,
)
from savepoint.config import JobConfig, config_to_dict, config_to_toml
from savepoint.config.layout import checked_pipeline_plan
from savepoint.config.layout import resolve_degrees as resolve_parallel_dims
from savepoint.data.dataset import build_dataloader
from savepoint.distributed import build_mesh, dp_rank, init_distributed, world_size
from savepoint.errors import ConfigError, SavepointError
from savepoint.hf.llama3 import Llama3HFAdapter
from savepoint.metrics import MetricsLog
from savepoint.models.llama3 import LLAMA3_FLAVORS, Transformer, build_model
from savepoint.models.llama3.activation_checkpoint import check_ac_options
from savepoint.models.llama3.model import initialize
from savepoint.models.llama3.parallelize import BlockOptions, column_sharded, mixed_precision, parallelize_llama
from savepoint.optim import build_lr_scheduler, build_optimizer, resume_schedule
from savepoint.parallel_dims import ParallelDims

if TYPE_CHECKING:
    from savepoint.pipelining import Pipeline

logger = logging.getLogger(__name__)


def clip_grad_norm_(parameters: list[torch.Tensor], max_norm: float,
                    pp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Total L2 norm of all gradients (over every shard, for DTensors, and every pipeline stage); clip to
    ``max_norm`` if > 0."""
    grads = [p.grad for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(total, DTensor):
        total = total.full_tensor()  # the norm over the whole (unsharded) gradient
    if pp_group is not None:
        from savepoint.pipelining import pp_grad_norm

        total = pp_grad_norm(total, pp_group)  # and over the other stages' gradients
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total, foreach=True)
    return total


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss: logits ``[bs, seq_len, vocab_size]``, labels ``[bs, seq_len]``."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def micro_steps(cfg: JobConfig, dims: ParallelDims) -> int:
    """Micro-steps per optimizer step: ``global_batch_size / (local_batch_size x dp)`` (1 for -1).

    Raises:
        ConfigError: the global batch is not a positive multiple of local x dp, or needs gradient
            accumulation under pipeline parallelism.
    """
    t = cfg.training
    per_micro = t.local_batch_size * dims.dp
    if t.global_batch_size == -1:
        return 1
    if t.global_batch_size < 1 or t.global_batch_size % per_micro:
        raise ConfigError([
            f"training.global_batch_size is {t.global_batch_size}, not a multiple of training.local_batch_size "
            f"{t.local_batch_size} x data-parallel degree {dims.dp} = {per_micro}; set it to a multiple of "
            f"{per_micro}, or to -1 (= {per_micro})"])
    if dims.pp > 1 and t.global_batch_size != per_micro:
        raise ConfigError([
            f"training.global_batch_size {t.global_batch_size} != local_batch_size x data-parallel degree "
            f"({per_micro}): gradient accumulation is not supported yet with pipeline parallelism; raise "
            "local_batch_size and use pipeline_parallel_microbatch_size"])
    return t.global_batch_size // per_micro


def block_options(cfg: JobConfig, device: torch.device) -> BlockOptions:
    """Activation checkpointing and compile of the blocks, checked against what this machine can run.

    Raises:
        ConfigError: an unknown mode, option or component, or inductor on a CPU without a C++ compiler.
    """
    ac, comp = cfg.activation_checkpoint, cfg.compile
    problems = [p for p in [check_ac_options(ac.mode, ac.selective_ac_option)] if p]
    unknown = sorted(set(comp.components) - {"model", "loss"})
    if unknown:
        problems.append(f"compile.components has {', '.join(map(repr, unknown))}; use 'model' and/or 'loss'")
    if comp.enable and comp.backend == "inductor" and device.type == "cpu":
        compilers = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++", "c++"]
        if not any(shutil.which(c) for c in compilers):
            problems.append("compile.enable: torch.compile's inductor backend needs a C++ compiler on CPU and "
                            f"none of {', '.join(compilers)} is on PATH; install g++ (or set CXX), or turn "
                            "compile off")
    if problems:
        raise ConfigError(problems)
    compile_model = comp.enable and "model" in comp.components
    return BlockOptions(ac_mode=ac.mode, ac_option=ac.selective_ac_option,
                        compile_backend=comp.backend if compile_model else None)


class NonFiniteLoss(SavepointError):
    """The loss or gradient norm of a step is NaN or infinite: training stops before the optimizer step."""


class Preemption:
    """SIGTERM during training: note it, so the loop stops after the step; enforce the grace period.

    A context manager: it installs its handler on entry (main thread only) and puts the old one
    back on exit. From the first SIGTERM, a timer runs for ``grace_seconds``; if the job is still
    saving when it fires, it logs an error and ends the process with status 1 (the main thread may
    be blocked in I/O or a collective, so only ``os._exit`` is sure to end it). The commit
    protocol keeps an unfinished save invisible; the next start removes its leftovers.
    """

    def __init__(self, grace_seconds: float):
        self.grace_seconds = grace_seconds
        self.requested = False
        self.step: int | None = None  # the step training was at, for the timeout message
        self._timer: threading.Timer | None = None
        self._previous: object = None
        self._installed = False

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)  # type: ignore[arg-type]
            self._installed = False

    def requested_at(self, step: int) -> bool:
        """Whether SIGTERM came; notes ``step`` as the one training is at (for the timeout message)."""
        self.step = step
        return self.requested

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            logger.warning("SIGTERM again: ignored, the preemption checkpoint is still being written")
            return
        self.requested = True
        logger.warning("SIGTERM: finishing the current step, then saving a checkpoint and exiting "
                       "(--checkpoint.preemption_grace_seconds=%g)", self.grace_seconds)
        self._timer = threading.Timer(self.grace_seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        where = f" at step {self.step}" if self.step is not None else ""
        logger.error("preempted%s: no checkpoint committed within --checkpoint.preemption_grace_seconds=%g of "
                     "SIGTERM; exiting with status 1. Nothing partial is visible (the latest committed step is "
                     "unchanged) and the next start removes the unfinished save; raise "
                     "--checkpoint.preemption_grace_seconds if the scheduler allows more time",
                     where, self.grace_seconds)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(1)


class Trainer:
    """Owns the model, optimizer, schedule, data and checkpoints of one training job."""

    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self.dims = resolve_parallel_dims(cfg, world_size())
        self.device = init_distributed(cfg.comm)
        self.metrics = MetricsLog(cfg.job.dump_folder, cfg.metrics.log_freq, cfg.metrics,  # first: fails fast
                                  model_args=LLAMA3_FLAVORS[cfg.model.flavor], seq_len=cfg.training.seq_len,
                                  device=self.device)
        if cfg.checkpoint.create_seed_checkpoint:
            self.device = torch.device("cpu")  # the seed's weights come from a CPU init, like every init here
        if cfg.training.deterministic:
            torch.use_deterministic_algorithms(True)
        self.micro_steps = micro_steps(cfg, self.dims)
        blocks = block_options(cfg, self.device)
        if cfg.job.print_config and (not dist.is_initialized() or dist.get_rank() == 0):
            logger.info("resolved config:\n%s", config_to_toml(cfg))
        self.mesh = build_mesh(self.dims, self.device)
        t = cfg.training
        mp_policy = mixed_precision(t.mixed_precision_param, t.mixed_precision_reduce, self.device)
        model_args = LLAMA3_FLAVORS[cfg.model.flavor].with_max_seq_len(t.seq_len)
        self.loss_fn = cross_entropy
        if cfg.compile.enable and "loss" in cfg.compile.components:
            self.loss_fn = torch.compile(cross_entropy, backend=cfg.compile.backend)

        def parallelize(m: torch.nn.Module) -> None:
            parallelize_llama(m, self.mesh, self.dims, mp_policy, blocks)  # type: ignore[arg-type]
        self.pipeline: Pipeline | None = None
        if self.dims.pp > 1:
            # torch.distributed.pipelining takes seconds to import: only pipeline-parallel jobs load it.
            from savepoint.pipelining import ModelParts, Pipeline

            assert self.mesh is not None
            with torch.device("meta"):
                whole = Transformer(model_args)
            plan = checked_pipeline_plan(cfg, self.dims.pp, model_args.n_layers)
            self.pipeline = Pipeline(plan, whole, self.mesh["pp"], self.device, parallelize, self.loss_fn)
            self.model = ModelParts(self.pipeline.parts, [name for name, _ in whole.named_children()])
            initialize(self.model, t.seed, self.device, args=model_args)  # the weights of a 1-process init
        else:
            self.model = build_model(model_args, seed=t.seed, device=self.device, parallelize=parallelize)
        self.params = list(self.model.parameters())
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg.lr_scheduler, t.steps)
        self.peak_lrs = list(self.lr_scheduler.base_lrs)  # this run's, whatever a checkpoint says
        self.dataloader = build_dataloader(t.dataset, t.seq_len, t.local_batch_size, t.seed,
                                           dp_rank=dp_rank(self.mesh, self.dims), dp_degree=self.dims.dp,
                                           tokenizer_path=cfg.model.hf_assets_path, dataset_path=t.dataset_path,
                                           vocab_size=model_args.vocab_size)
        self.train_state = TrainState()
        self.checkpointer = CheckpointManager(
            cfg.checkpoint,
            cfg.job.dump_folder,
            self.model,
            states={
                OPTIMIZER: OptimizerState(self.model, self.optimizer),
                LR_SCHEDULER: LRSchedulerState(self.lr_scheduler),
                DATALOADER: self.dataloader,
                TRAIN_STATE: self.train_state,
            },
            job_config=config_to_dict(cfg),
            layout=self.dims.as_dict(),
            column_tiled=column_sharded,
            hf_adapter=Llama3HFAdapter(LLAMA3_FLAVORS[cfg.model.flavor], cfg.model.flavor),
            hf_assets_path=cfg.model.hf_assets_path,
        )
        self.loaded_step: int | None = None
        self._loaded = False

    def load_checkpoint(self) -> int | None:
        """Restore from the checkpoint folder or the initial load path (once); returns the loaded step."""
        if not self._loaded:
            self.loaded_step = self.checkpointer.load(step=self.cfg.checkpoint.load_step)
            self._loaded = True
            if self.loaded_step is not None:  # the next step's lr comes from this run's schedule
                resume_schedule(self.lr_scheduler, self.peak_lrs)
        return self.loaded_step

    def create_seed_checkpoint(self) -> None:
        """Write the initial weights as step-0 (see ``CheckpointManager.save_seed``)."""
        self.checkpointer.save_seed()
        logger.info("seed checkpoint written to %s; start training runs at any layout from it",
                    self.checkpointer.folder.step_dir(0))

    def train_step(self) -> dict:
        """Forward and backward on the next global batch (``micro_steps`` of them), then the optimizer
        step; returns the step's metrics.

        Each micro-step reads the next ``local_batch_size x dp`` samples of the global stream, so the
        samples of an optimizer step are the same at every split into ranks and micro-steps, and a
        checkpoint (taken between optimizer steps) holds one position whatever the split.

        Raises:
            NonFiniteLoss: the loss or gradient norm is not finite (checked on every rank alike,
                before the optimizer step, so the weights stay those of the step before).
        """
        first = self.dataloader.sample_index  # global sample stream position of this step's batch
        if self.pipeline is not None:  # the loss exists on the last stage only
            inputs, labels = (t.to(self.device) for t in self.dataloader.next_batch())
            global_loss = self.pipeline.global_loss(self.pipeline.step(inputs, labels), self.dims.world_size)
            pp_group = self.pipeline.group
            self.train_state.ntokens_seen += inputs.numel() * self.dims.dp
        else:
            global_loss, pp_group = self._global_mean(self._accumulate()), None
        grad_norm = clip_grad_norm_(self.params, self.cfg.training.max_norm, pp_group)
        norm = grad_norm.item()  # like the loss, the same on every rank
        if not (math.isfinite(global_loss) and math.isfinite(norm)):
            raise self._non_finite(global_loss, norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.checkpointer.wait_for_staging()  # an async save must finish copying before parameters change
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": global_loss, "lr": float(lr), "grad_norm": norm,
                "samples": [first, self.dataloader.sample_index]}

    def _accumulate(self) -> torch.Tensor:
        """Forward and backward of each micro-step; returns this rank's mean loss over them.

        Each micro-step's mean loss is divided by the number of micro-steps, so the summed gradient is
        that of the mean over every sample of the step, as one batch of ``global / dp`` samples gives.
        """
        total = torch.zeros((), device=self.device)
        for _ in range(self.micro_steps):
            inputs, labels = (t.to(self.device) for t in self.dataloader.next_batch())
            loss = self.loss_fn(self.model(inputs), labels) / self.micro_steps
            loss.backward()
            total += loss.detach()
            self.train_state.ntokens_seen += inputs.numel() * self.dims.dp  # global: the same at every layout
        return total

    def _non_finite(self, loss: float, grad_norm: float) -> NonFiniteLoss:
        step = self.train_state.step
        committed = self.checkpointer.folder.committed_steps() if self.checkpointer.cfg.enable else []
        where = (f"the latest committed step is step-{committed[-1]} in {self.checkpointer.folder.root}"
                 if committed else "no checkpoint was committed")
        bad = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {grad_norm} (loss {loss})"
        return NonFiniteLoss(
            f"step {step}: {bad}, so training stopped before the optimizer step and saved nothing; {where}. "
            "Lower --optimizer.lr or --training.max_norm, or resume from an earlier step with --checkpoint.load_step")

    def _global_mean(self, loss: torch.Tensor) -> float:
        """The loss over the global batch: the mean over ranks (TP ranks hold equal copies, so this is the dp mean)."""
        if not dist.is_initialized() or self.dims.world_size == 1:
            return loss.item()
        total = loss.float().clone()
        dist.all_reduce(total)
        return total.item() / dist.get_world_size()

    def train(self, stop_after: int | None = None) -> None:
        """Resume if there is a checkpoint, then train to ``training.steps``.

        ``stop_after`` ends the run early at that step, as a crash or preemption would, while the
        schedule still spans ``training.steps`` (used by resume tests and tools).
        """
        with Preemption(self.cfg.checkpoint.preemption_grace_seconds) as preemption:
            self._train(stop_after, preemption)

    def _train(self, stop_after: int | None, preemption: Preemption) -> None:
        loaded = self.load_checkpoint()
        self.metrics.resumed(loaded)
        steps = self.cfg.training.steps
        if loaded is not None and self.train_state.step >= steps:
            logger.info("checkpoint is at step %d, --training.steps is %d: nothing to train",
                        self.train_state.step, steps)
        logger.info("training %s (%s) from step %d to %d on %s, %s", self.cfg.model.name, self.cfg.model.flavor,
                    self.train_state.step, steps, self.device, self.dims.describe())
        last = steps if stop_after is None else min(steps, stop_after)
        # SIGTERM during start-up stops before the first step (the checkpointer saves what it must).
        stop = self.train_state.step < last and self.checkpointer.check_stop(self.train_state.step,
                                                                             preemption.requested_at)
        while not stop and self.train_state.step < last:
            self.train_state.step += 1
            step = self.train_state.step
            start = time.perf_counter()
            record = self.train_step()
            elapsed = time.perf_counter() - start
            record["tokens_per_second"] = (self.dataloader.local_batch_size * self.micro_steps
                                          * self.cfg.training.seq_len / elapsed)
            self.metrics.maybe_log(step, step == steps, record)
            # Saves if due, commits a finished async save, and stops (after a preemption save) on SIGTERM.
            stop = self.checkpointer.step_done(step, preemption.requested_at, last_step=step == steps,
                                               more=step < last)
            self.metrics.committed(self.checkpointer.writer.committed)
        if not stop:
            logger.info("stopped at step %d", self.train_state.step)


def run(cfg: JobConfig) -> None:
    """Train as ``cfg`` says, then tear down the process group."""
    trainer: Trainer | None = None
    try:
        trainer = Trainer(cfg)
        if cfg.checkpoint.create_seed_checkpoint:
            trainer.create_seed_checkpoint()
        else:
            trainer.train()
        trainer.checkpointer.close()
        trainer.metrics.committed(trainer.checkpointer.writer.committed)
    except BaseException:
        # This process ends on an error (often another rank died): the RAM save in flight is still this
        # rank's valid copy, and committing it needs no other rank, so a restart can use it. The process
        # would wait for its writer thread at exit anyway (torchrun SIGKILLs it 30 s after the failure).
        if trainer is not None and trainer.checkpointer.memory is not None:
            try:
                trainer.checkpointer.memory.finish()
            except Exception as e:  # the error being raised is the one to report
                logger.warning("could not commit the in-memory save in flight (%s)", e)
        raise
    finally:
        if trainer is not None:
            trainer.metrics.close()
        # After a failure, other ranks may be gone or stuck: skip close()'s collectives, but free
        # the folder for the next job (a local operation).
        if trainer is not None and trainer.checkpointer.lock is not None:
            trainer.checkpointer.lock.release()
        if dist.is_initialized():
            dist.destroy_process_group()
