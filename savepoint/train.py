"""The training loop: build the parts from the config, resume, train, checkpoint.

The loop calls the checkpoint manager at fixed points: ``load`` once before the first step and
``save`` after every step (the manager decides whether the step is due).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

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
from savepoint.config import JobConfig, config_to_dict
from savepoint.config.layout import resolve_parallel_dims
from savepoint.data.dataset import build_dataloader
from savepoint.distributed import build_mesh, dp_rank, init_distributed, world_size
from savepoint.hf.llama3 import Llama3HFAdapter
from savepoint.models.llama3 import LLAMA3_FLAVORS, build_model
from savepoint.models.llama3.parallelize import column_sharded, mixed_precision, parallelize_llama
from savepoint.optim import build_lr_scheduler, build_optimizer

logger = logging.getLogger(__name__)


def clip_grad_norm_(parameters: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Total L2 norm of all gradients (over every shard, for DTensors); clip to ``max_norm`` if > 0."""
    grads = [p.grad for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(total, DTensor):
        total = total.full_tensor()  # the norm over the whole (unsharded) gradient
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total, foreach=True)
    return total


class MetricsLog:
    """Loss and friends, on the log and appended as JSON lines to ``<dump_folder>/metrics.jsonl``."""

    def __init__(self, dump_folder: str, log_freq: int):
        self.path = Path(dump_folder) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.log_freq = log_freq
        self.writes_file = not dist.is_initialized() or dist.get_rank() == 0  # values are global: one writer

    def maybe_log(self, step: int, last_step: bool, record: dict) -> None:
        if step % self.log_freq and not last_step:
            return
        logger.info("step %5d  loss %.6f  lr %.3e  grad_norm %.4f  %.0f tok/s", step, record["loss"],
                    record["lr"], record["grad_norm"], record["tokens_per_second"])
        if not self.writes_file:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")


class Trainer:
    """Owns the model, optimizer, schedule, data and checkpoints of one training job."""

    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self.dims = resolve_parallel_dims(cfg, world_size())
        self.device = init_distributed(cfg.comm)
        if cfg.checkpoint.create_seed_checkpoint:
            self.device = torch.device("cpu")  # the seed's weights come from a CPU init, like every init here
        if cfg.training.deterministic:
            torch.use_deterministic_algorithms(True)
        self.mesh = build_mesh(self.dims, self.device)
        t = cfg.training
        mp_policy = mixed_precision(t.mixed_precision_param, t.mixed_precision_reduce, self.device)
        model_args = LLAMA3_FLAVORS[cfg.model.flavor].with_max_seq_len(t.seq_len)
        self.model = build_model(
            model_args, seed=t.seed, device=self.device,
            parallelize=(lambda m: parallelize_llama(m, self.mesh, self.dims, mp_policy)) if self.mesh else None,
        )
        self.params = list(self.model.parameters())
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg.lr_scheduler, t.steps)
        self.dataloader = build_dataloader(t.dataset, t.seq_len, t.local_batch_size, t.seed,
                                           dp_rank=dp_rank(self.mesh, self.dims), dp_degree=self.dims.dp)
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
        return self.loaded_step

    def create_seed_checkpoint(self) -> None:
        """Write the initial weights as step-0 (see ``CheckpointManager.save_seed``)."""
        self.checkpointer.save_seed()
        logger.info("seed checkpoint written to %s; start training runs at any layout from it",
                    self.checkpointer.folder.step_dir(0))

    def train_step(self) -> dict:
        first = self.dataloader.sample_index  # global sample stream position of this step's batch
        inputs, labels = (t.to(self.device) for t in self.dataloader.next_batch())
        logits = self.model(inputs)  # [bs, seq_len, vocab_size]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        loss.backward()
        grad_norm = clip_grad_norm_(self.params, self.cfg.training.max_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.checkpointer.wait_for_staging()  # an async save must finish copying before parameters change
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.train_state.ntokens_seen += inputs.numel() * self.dims.dp  # global: the same at every layout
        return {"loss": self._global_mean(loss.detach()), "lr": float(lr), "grad_norm": grad_norm.item(),
                "samples": [first, first + self.dataloader.local_batch_size * self.dims.dp]}

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
        loaded = self.load_checkpoint()
        steps = self.cfg.training.steps
        if loaded is not None and self.train_state.step >= steps:
            logger.info("checkpoint is at step %d, --training.steps is %d: nothing to train",
                        self.train_state.step, steps)
        logger.info("training %s (%s) from step %d to %d on %s, %s", self.cfg.model.name, self.cfg.model.flavor,
                    self.train_state.step, steps, self.device, self.dims.describe())
        last = steps if stop_after is None else min(steps, stop_after)
        while self.train_state.step < last:
            self.checkpointer.poll()  # commits a finished async save, or raises its error
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
        trainer = Trainer(cfg)
        if cfg.checkpoint.create_seed_checkpoint:
            trainer.create_seed_checkpoint()
        else:
            trainer.train()
        trainer.checkpointer.close()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
