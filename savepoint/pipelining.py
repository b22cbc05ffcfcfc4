"""Pipeline parallelism at run time: a rank's model parts, their stages, and the schedule that runs them.

The plan (which modules each stage holds, which stages each rank runs) is
``savepoint.pipeline_plan``; this module builds it with ``torch.distributed.pipelining``. Each
model part is a copy of the whole model with the modules other stages hold removed, so it keeps
the global names (``layers.3.attention.wq.weight`` on whichever stage holds layer 3). The parts
of one rank are gathered under those names in one :class:`ModelParts` module: the optimizer, the
gradient clipping and the checkpoint see one model that holds some of the tensors, and a PP
checkpoint has the keys of a one-process one.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleMulti, get_schedule_class

from savepoint.pipeline_plan import PipelinePlan

logger = logging.getLogger(__name__)


class ModelParts(nn.Module):
    """The union of a rank's model parts under their global names; it shares their modules.

    It is never run (the schedule runs the parts); it gives the optimizer, the clipping and the
    checkpoint the rank's tensors in the model's order.
    """

    def __init__(self, parts: list[nn.Module], order: list[str]):
        super().__init__()
        self.parts = parts  # a plain list: the parts' modules are registered below, under global names
        for name in order:  # the whole model's top-level module names, in its order
            held = [getattr(p, name) for p in parts if getattr(p, name, None) is not None]
            if not held:
                continue
            if isinstance(held[0], nn.ModuleDict):
                merged = {k: m for d in held for k, m in d.items()}
                if merged:
                    self.add_module(name, nn.ModuleDict({k: merged[k] for k in sorted(merged, key=_layer_key)}))
            else:
                self.add_module(name, held[0])


def _layer_key(name: str) -> tuple[int, str]:
    return (int(name), "") if name.isdigit() else (1 << 30, name)


def split_model(whole: nn.Module, modules: tuple[str, ...]) -> nn.Module:
    """A copy of ``whole`` (on the meta device) keeping only ``modules`` (``tok_embeddings``, ``layers.3``, ...)."""
    part = copy.deepcopy(whole)
    keep = set(modules)
    for name, child in list(part.named_children()):
        if isinstance(child, (nn.ModuleDict, nn.ModuleList)):
            inner = {m.split(".", 1)[1] for m in keep if m.startswith(name + ".")}
            if isinstance(child, nn.ModuleList):
                raise TypeError(f"{name}: pipeline stages need a ModuleDict of layers (stable names), not a ModuleList")
            for key in list(child.keys()):
                if key not in inner:
                    del child[key]
        elif name not in keep:
            setattr(part, name, None)
    return part


class Pipeline:
    """This rank's stages and the schedule that runs a step's microbatches through every rank's stages.

    Args:
        plan: the checked plan (``pipeline_plan.plan_pipeline``).
        whole: the whole model on the meta device; it is split, not changed.
        pp_mesh: the ``pp`` dimension of the device mesh.
        device: this rank's device.
        parallelize: applied to each part (TP, then FSDP), before it is materialised.
        loss_fn: ``loss_fn(logits, labels)`` of one microbatch (its mean).
    """

    def __init__(self, plan: PipelinePlan, whole: nn.Module, pp_mesh: DeviceMesh, device: torch.device,
                 parallelize: Callable[[nn.Module], None] | None,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.plan = plan
        self.group = pp_mesh.get_group()
        pp_rank = pp_mesh.get_local_rank()
        self.stage_ids = plan.stages_of(pp_rank)
        self.parts: list[nn.Module] = []
        for stage_id in self.stage_ids:
            part = split_model(whole, plan.modules_per_stage[stage_id])
            if parallelize is not None:
                parallelize(part)
            part.to_empty(device=device)
            part.init_buffers(device)  # type: ignore[operator]  # buffers to_empty left uninitialised
            self.parts.append(part)
            logger.info("PP rank %d holds stage %d: %s", pp_rank, stage_id, _summary(plan.modules_per_stage[stage_id]))
        self.stages = [PipelineStage(part, s, plan.num_stages, device, group=self.group)
                       for part, s in zip(self.parts, self.stage_ids, strict=True)]
        self.has_first = 0 in self.stage_ids
        self.has_last = plan.num_stages - 1 in self.stage_ids
        schedule_class = get_schedule_class(plan.schedule)
        looped = issubclass(schedule_class, PipelineScheduleMulti)
        # scale_grads: each microbatch's mean loss is divided by their count, so the gradient is
        # that of the whole batch's mean loss, as without a pipeline.
        logger.info("pipeline: %s over %d PP ranks", plan.describe(), plan.pp)
        self.schedule = schedule_class(self.stages if looped else self.stages[0], n_microbatches=plan.n_microbatches,
                                       loss_fn=loss_fn, scale_grads=True)

    def step(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """Forward and backward of one batch; the batch's mean loss on the rank holding the last stage, else None."""
        losses: list[torch.Tensor] = []
        if self.has_first:
            self.schedule.step(inputs, target=labels, losses=losses, return_outputs=False)
        else:
            self.schedule.step(target=labels, losses=losses, return_outputs=False)
        if not self.has_last:
            return None
        return torch.stack([loss.detach().float() for loss in losses]).mean()

    def global_loss(self, loss: torch.Tensor | None, world_size: int) -> float:
        """The batch loss everywhere: the mean over the last stage's ranks (``world_size / pp`` of them)."""
        total = (loss if loss is not None else torch.zeros((), device=self._device())).float().clone()
        dist.all_reduce(total)
        return total.item() / (world_size // self.plan.pp)

    def _device(self) -> torch.device:
        return next(self.parts[0].parameters()).device


def _summary(modules: tuple[str, ...]) -> str:
    layers = [m for m in modules if m.startswith("layers.")]
    others = [m for m in modules if not m.startswith("layers.")]
    span = f"{layers[0]}..{layers[-1].split('.', 1)[1]}" if len(layers) > 1 else ", ".join(layers)
    return ", ".join(x for x in (span, *others) if x)


def pp_grad_norm(total: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """The L2 norm over every stage's gradients, from this stage's norm ``total``."""
    squared = total.float() ** 2
    dist.all_reduce(squared, group=group)
    return squared.sqrt()
