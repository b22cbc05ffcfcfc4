"""The training loop: build the parts from the config, resume, train, checkpoint.

The loop calls the checkpoint manager at fixed points: ``load`` once before the first step and
``save`` after every step (the manager decides whether the step is due).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

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
from savepoint.config import JobConfig, config_to_dict
from savepoint.data.dataset import build_dataloader
from savepoint.errors import NotSupportedYet
from savepoint.models.llama3 import LLAMA3_FLAVORS, build_model
from savepoint.optim import build_lr_scheduler, build_optimizer

logger = logging.getLogger(__name__)


def init_distributed() -> torch.device:
    """Join the torchrun process group, if launched by torchrun; returns this rank's device.

    Raises:
        NotSupportedYet: more than one process, or a parallel degree above 1.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        raise NotSupportedYet(
            f"training with {world_size} processes (NGPU={world_size}) is not supported yet; run with NGPU=1"
        )
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
        else torch.device("cpu")
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def check_parallelism(cfg: JobConfig) -> None:
    p = cfg.parallelism
    for name in ("data_parallel_replicate_degree", "data_parallel_shard_degree", "tensor_parallel_degree",
                 "pipeline_parallel_degree", "context_parallel_degree", "expert_parallel_degree"):
        if getattr(p, name) > 1:
            raise NotSupportedYet(f"--parallelism.{name}={getattr(p, name)} is not supported yet; set it to 1")


class MetricsLog:
    """Loss and friends, on the log and appended as JSON lines to ``<dump_folder>/metrics.jsonl``."""

    def __init__(self, dump_folder: str, log_freq: int):
        self.path = Path(dump_folder) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.log_freq = log_freq

    def maybe_log(self, step: int, last_step: bool, record: dict) -> None:
        if step % self.log_freq and not last_step:
            return
        logger.info("step %5d  loss %.6f  lr %.3e  grad_norm %.4f  %.0f tok/s", step, record["loss"],
                    record["lr"], record["grad_norm"], record["tokens_per_second"])
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")


class Trainer:
    """Owns the model, optimizer, schedule, data and checkpoints of one training job."""

    def __init__(self, cfg: JobConfig):
        check_parallelism(cfg)
        self.cfg = cfg
        self.device = init_distributed()
        if cfg.training.deterministic:
            torch.use_deterministic_algorithms(True)
        model_args = LLAMA3_FLAVORS[cfg.model.flavor].with_max_seq_len(cfg.training.seq_len)
        self.model = build_model(model_args, seed=cfg.training.seed, device=self.device)
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg.lr_scheduler, cfg.training.steps)
        t = cfg.training
        self.dataloader = build_dataloader(t.dataset, t.seq_len, t.local_batch_size, t.seed)
        self.train_state = TrainState()
        self.metrics = MetricsLog(cfg.job.dump_folder, cfg.metrics.log_freq)
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
        )

    def train_step(self) -> dict:
        inputs, labels = (t.to(self.device) for t in self.dataloader.next_batch())
        logits = self.model(inputs)  # [bs, seq_len, vocab_size]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        loss.backward()
        max_norm = self.cfg.training.max_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm if max_norm > 0 else float("inf"))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.train_state.ntokens_seen += inputs.numel()
        return {"loss": loss.item(), "lr": float(lr), "grad_norm": grad_norm.item()}

    def train(self, stop_after: int | None = None) -> None:
        """Resume if there is a checkpoint, then train to ``training.steps``.

        ``stop_after`` ends the run early at that step, as a crash or preemption would, while the
        schedule still spans ``training.steps`` (used by resume tests and tools).
        """
        loaded = self.checkpointer.load(step=self.cfg.checkpoint.load_step)
        steps = self.cfg.training.steps
        if loaded is not None and self.train_state.step >= steps:
            logger.info("checkpoint is at step %d, --training.steps is %d: nothing to train",
                        self.train_state.step, steps)
        logger.info("training %s (%s) from step %d to %d on %s", self.cfg.model.name, self.cfg.model.flavor,
                    self.train_state.step, steps, self.device)
        last = steps if stop_after is None else min(steps, stop_after)
        while self.train_state.step < last:
            self.train_state.step += 1
            step = self.train_state.step
            start = time.perf_counter()
            record = self.train_step()
            elapsed = time.perf_counter() - start
            record["tokens_per_second"] = self.dataloader.local_batch_size * self.cfg.training.seq_len / elapsed
            self.metrics.maybe_log(step, step == steps, record)
            self.checkpointer.save(step, last_step=(step == steps))
        logger.info("stopped at step %d", self.train_state.step)


def run(cfg: JobConfig) -> None:
    """Train as ``cfg`` says, then tear down the process group."""
    try:
        Trainer(cfg).train()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
