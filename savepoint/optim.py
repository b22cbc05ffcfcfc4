"""The optimizer (AdamW) and the warmup + decay learning-rate schedule."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import nn

from savepoint.config.job_config import LRScheduler as LRSchedulerConfig
from savepoint.config.job_config import Optimizer as OptimizerConfig

logger = logging.getLogger(__name__)


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.AdamW:
    impl = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    return torch.optim.AdamW(
        model.parameters(),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        **impl[cfg.implementation],
    )


def lr_factor_fn(cfg: LRSchedulerConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr after ``n`` scheduler steps: linear warmup, stable, then decay.

    The same values as TorchTitan v0.2.2's warmup-stable-decay schedule, so a run resumed from a
    TorchTitan checkpoint continues on the curve it was on: warmup reaches the peak at its last step,
    warmup longer than the run is cut to the run, decay is cut so warmup + decay fit, and the decay
    ends one step past the last (the last step never trains at ``min_lr_factor`` alone).

    A plain function (not a callable object) so LambdaLR keeps it out of the checkpoint: the
    schedule always comes from the config, only the counters are saved.
    """
    warmup = min(cfg.warmup_steps, total_steps)
    decay_steps = round(total_steps * cfg.decay_ratio) if cfg.decay_ratio is not None else total_steps - warmup
    decay_steps = min(decay_steps, total_steps - warmup)
    decay_start = total_steps + 1 - decay_steps  # warmup + stable steps, with the virtual last step

    def factor(n: int) -> float:
        if n < warmup:
            return (n + 1) / warmup
        if n < decay_start or decay_steps <= 0:
            return 1.0
        progress = min((n + 1 - decay_start) / decay_steps, 1.0)  # past the last step (a shorter resumed run)
        if cfg.decay_type == "linear":
            curve = 1.0 - progress
        elif cfg.decay_type == "sqrt":
            curve = 1.0 - math.sqrt(progress)
        else:
            curve = 0.5 * (1.0 + math.cos(math.pi * progress))
        return cfg.min_lr_factor + (1.0 - cfg.min_lr_factor) * curve

    return factor


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: LRSchedulerConfig,
                       total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor_fn(cfg, total_steps))


def resume_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, peak_lrs: list[float]) -> None:
    """After a load, set every param group's lr from this run's schedule at the restored position.

    A load restores the optimizer's param groups, whose ``lr`` is the *old* schedule's last value
    (0 at the end of a decay), and the scheduler's counters. The scheduler only writes ``lr`` at
    its next ``step()``, so without this the first step after the load would train at the stale
    value. ``peak_lrs`` are this run's ``--optimizer.lr`` per group (the checkpoint's ``base_lrs``
    and ``initial_lr`` are the old run's). With unchanged settings this recomputes the same floats
    the scheduler last wrote, so a resume stays bit-exact.
    """
    n = scheduler.last_epoch
    lrs = [peak * fn(n) for peak, fn in zip(peak_lrs, scheduler.lr_lambdas, strict=True)]
    stale = [group["lr"] for group in scheduler.optimizer.param_groups]
    for group, peak, lr in zip(scheduler.optimizer.param_groups, peak_lrs, lrs, strict=True):
        group["initial_lr"] = peak
        group["lr"] = lr
    scheduler.base_lrs = list(peak_lrs)
    scheduler._last_lr = list(lrs)  # what get_last_lr() reports
    if stale != lrs:
        logger.info("learning rate after %d scheduler steps: %.3e from this run's schedule (the checkpoint held "
                    "%.3e, from the schedule it was saved with)", n, lrs[0], stale[0])
