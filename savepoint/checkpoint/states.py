"""State adapters: what each training component contributes to a checkpoint, and how it is restored.

Keys follow TorchTitan v0.2.x. Model parameters go flat at the top level; the optimizer is
flattened and keyed by parameter FQN (``optimizer.state.<fqn>.exp_avg``), so the layout does not
depend on parameter order or on how the model is sharded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

MODEL = "model"
OPTIMIZER = "optimizer"
LR_SCHEDULER = "lr_scheduler"
DATALOADER = "dataloader"
TRAIN_STATE = "train_state"
# Components a user may leave out of a load with --checkpoint.exclude_from_loading.
EXCLUDABLE = (OPTIMIZER, LR_SCHEDULER, DATALOADER, TRAIN_STATE)


class ModelState:
    """The model's tensors under their FQNs, ready to sit flat at the top of a checkpoint."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        set_model_state_dict(self.model, state_dict, options=StateDictOptions(strict=True))


class OptimizerState(Stateful):
    """AdamW state flattened to ``state.<fqn>.<name>`` and ``param_groups.<fqn>.<key>``."""

    options = StateDictOptions(flatten_optimizer_state_dict=True)

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer, options=self.options)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state_dict, options=self.options)


class LRSchedulerState(Stateful):
    """The scheduler's counters (``last_epoch``, ``_last_lr``, ...); the schedule itself comes from config."""

    def __init__(self, scheduler: torch.optim.lr_scheduler.LRScheduler):
        self.scheduler = scheduler

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state_dict)


class TrainState(Stateful):
    """Step, tokens seen, and the RNG states that make resume bit-exact."""

    def __init__(self) -> None:
        self.step = 0
        self.ntokens_seen = 0

    def state_dict(self) -> dict[str, Any]:
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        return {"step": self.step, "ntokens_seen": self.ntokens_seen, "rng_state": rng}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict["step"])
        self.ntokens_seen = int(state_dict["ntokens_seen"])
        rng = state_dict.get("rng_state") or {}  # TorchTitan checkpoints carry no RNG state
        if "cpu" in rng:
            torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
