"""Process group, device and device mesh for one training job.

Under torchrun every process joins one process group (nccl on CUDA, gloo on CPU, or what
``--comm.backend`` says) and a mesh ``("dp_replicate", "dp_shard", "tp")`` is built from the
resolved degrees. A single process without torchrun needs neither.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from savepoint.config.job_config import Comm
from savepoint.config.layout import ParallelDims
from savepoint.errors import ConfigError

logger = logging.getLogger(__name__)

MESH_DIMS = ("dp_replicate", "dp_shard", "tp")


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(comm: Comm) -> torch.device:
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
    """The 3-D mesh ``dp_replicate x dp_shard x tp`` (sizes may be 1); None for one process."""
    if dims.world_size == 1:
        return None
    return init_device_mesh(device.type, (dims.dp_replicate, dims.dp_shard, dims.tp), mesh_dim_names=MESH_DIMS)


def dp_rank(mesh: DeviceMesh | None, dims: ParallelDims) -> int:
    """This rank's index among the data-parallel ranks (ranks that differ only in TP share it)."""
    if mesh is None:
        return 0
    return mesh.get_local_rank("dp_replicate") * dims.dp_shard + mesh.get_local_rank("dp_shard")
