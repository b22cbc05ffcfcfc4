"""Process group, device and device mesh for one training job.

Under torchrun every process joins one process group (nccl on CUDA, gloo on CPU, or what
``--comm.backend`` says) and a mesh ``("pp", "dp_replicate", "dp_shard", "tp")`` is built from
the resolved degrees (TorchTitan's order: ranks that differ only in TP are neighbours).
A single process without torchrun needs neither.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Protocol

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from savepoint.errors import ConfigError
from savepoint.parallel_dims import ParallelDims

logger = logging.getLogger(__name__)

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


class CommSettings(Protocol):
    """What joining the process group needs: the job's ``[comm]`` section (``savepoint.config.Comm``)."""

    backend: str
    init_timeout_seconds: int


def init_distributed(comm: CommSettings) -> torch.device:
    """Join torchrun's process group (once per process); returns this rank's device.

    Raises:
        ConfigError: ``--comm.backend nccl`` without CUDA.
    """
    backend = comm.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError(["--comm.backend nccl needs CUDA, which this machine does not have; "
                           "use --comm.backend gloo (or auto)"])
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=comm.init_timeout_seconds),
                                device_id=device if device.type == "cuda" else None)
        logger.info("joined process group: rank %d of %d, backend %s, device %s",
                    dist.get_rank(), dist.get_world_size(), backend, device)
    return device


def build_mesh(dims: ParallelDims, device: torch.device) -> DeviceMesh | None:
    """The 4-D mesh ``pp x dp_replicate x dp_shard x tp`` (sizes may be 1); None for one process."""
    if dims.world_size == 1:
        return None
    return init_device_mesh(device.type, (dims.pp, dims.dp_replicate, dims.dp_shard, dims.tp),
                            mesh_dim_names=MESH_DIMS)


def dp_rank(mesh: DeviceMesh | None, dims: ParallelDims) -> int:
    """This rank's index among the data-parallel ranks (ranks that differ only in TP or PP share it)."""
    if mesh is None:
        return 0
    return mesh.get_local_rank("dp_replicate") * dims.dp_shard + mesh.get_local_rank("dp_shard")


@torch.no_grad()
def copy_full_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the full CPU tensor into ``target``, or into this rank's shard of it when it is a DTensor.

    Every rank holds the same full tensor, so each takes its own shard without communicating. For
    plain Shard/Replicate placements the shard is cut on the CPU, so only it reaches the device.
    """
    if not isinstance(target, DTensor):
        target.copy_(full)
    elif all(type(p) in (Shard, Replicate) for p in target.placements):
        shape, offset = compute_local_shape_and_global_offset(full.shape, target.device_mesh, target.placements)
        target.to_local().copy_(full[tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))])
    else:  # e.g. FSDP over TP (_StridedShard): DTensor knows how to cut it
        shard = distribute_tensor(full.to(target.device), target.device_mesh, target.placements, src_data_rank=None)
        target.to_local().copy_(shard.to_local())
